"""Where models live: the default (bundled demo) model and the models/ folder."""
from __future__ import annotations

import os
from pathlib import Path

# The demo model that ships in the repository (models/demo/, see docs/demo-model.md).
DEMO_MODEL = Path("models") / "demo" / "demo.bnr"
MODEL_ENV = "BITNET_RUN_MODEL"


def _source_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_model() -> Path:
    """$BITNET_RUN_MODEL, else models/demo/demo.bnr under the current folder or the source tree."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    for root in (Path.cwd(), _source_root()):
        candidate = root / DEMO_MODEL
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no model given and the demo model {DEMO_MODEL} was not found here or in {_source_root()}; "
        f"pass -m MODEL.bnr, set {MODEL_ENV}, or run `make demo` in the repository"
    )


def models_dir() -> Path:
    """The folder `pull` writes to: ./models when it exists, else ~/.cache/bitnet-run/models."""
    local = Path.cwd() / "models"
    if local.is_dir():
        return local
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bitnet-run" / "models"
