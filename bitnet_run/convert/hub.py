"""Where a checkpoint comes from: a local directory, or a Hugging Face hub repo id downloaded once."""
from __future__ import annotations

import re
from pathlib import Path

from .errors import ConversionError

# Everything the converter reads: configs, tokenizer files, chat template, weights.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def download_snapshot(repo_id: str) -> Path:
    """Fetch (or reuse from the hub cache) the files of `repo_id` that conversion needs."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS))
    except OSError as e:  # hub HTTP errors and offline cache misses are all OSErrors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{repo_id}: not a local directory, and the hub download failed ({reason})") from e


def resolve_source(src: str | Path) -> tuple[Path, str]:
    """(local checkpoint directory, label for general.source) of a path or hub repo id.

    A local checkpoint is labelled by its folder name, not its absolute path, so that converting the
    same checkpoint anywhere gives the same bytes (the shipped demo model is checked that way)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path.resolve(), path.resolve().name
    if path.exists():
        raise ConversionError(f"{src}: is a file (expected a checkpoint directory or a hub repo id)")
    if isinstance(src, str) and _REPO_ID.match(src):
        return download_snapshot(src), src
    raise ConversionError(f"{src}: no such directory, and not a hub repo id of the form 'owner/name'")
