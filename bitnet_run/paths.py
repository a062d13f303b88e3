"""Where things live: the bundled demo model and the bitnet-run home folder (the model store)."""
from __future__ import annotations

import os
from pathlib import Path

# The demo model of the repository (models/demo/, see docs/demo-model.md). A built package carries
# the same file as package data at bitnet_run/demo/demo.bnr (pyproject.toml, [tool.setuptools]).
DEMO_MODEL = Path("models") / "demo" / "demo.bnr"
PACKAGED_DEMO_MODEL = Path(__file__).resolve().parent / "demo" / "demo.bnr"
MODEL_ENV = "BITNET_RUN_MODEL"
HOME_ENV = "BITNET_RUN_HOME"


def _source_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_model() -> Path:
    """$BITNET_RUN_MODEL, else the demo model installed with the package, else (an editable install
    or a source checkout) models/demo/demo.bnr of the source tree. Never depends on the current folder."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    for candidate in (PACKAGED_DEMO_MODEL, _source_root() / DEMO_MODEL):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no model given and the demo model is not installed ({PACKAGED_DEMO_MODEL} is missing); "
        f"pass -m MODEL, set {MODEL_ENV}, or reinstall bitnet-run"
    )


def home() -> Path:
    """$BITNET_RUN_HOME, else ~/.cache/bitnet-run: the one folder bitnet-run keeps models in."""
    value = os.environ.get(HOME_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "bitnet-run"


def models_dir() -> Path:
    """The model store: one folder per model under home()/models (bitnet_run/store.py)."""
    return home() / "models"
