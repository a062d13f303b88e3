"""Where a checkpoint comes from: a local directory, or a Hugging Face hub repo downloaded once.

Downloads go through huggingface_hub into its cache (resumable; HF_TOKEN, HF_HUB_OFFLINE and
HF_HOME are honoured as huggingface_hub does), with its progress bars while stderr is a terminal.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from .errors import ConversionError

# Everything the converter reads: configs, tokenizer files, chat template, weights.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
# The file name microsoft's and tiiuae's GGUF repos use for their I2_S model.
DEFAULT_GGUF_FILE = "ggml-model-i2_s.gguf"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def _download_error(repo_id: str, what: str, e: Exception) -> ConversionError:
    """One line for a failed download, by the kind of failure."""
    from huggingface_hub import errors

    if isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)) and _offline():
        return ConversionError(f"{repo_id}: {what} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
                               "(unset it to download)")
    if isinstance(e, errors.GatedRepoError):
        return ConversionError(f"{repo_id}: the repo is gated (accept its terms on huggingface.co, then set HF_TOKEN)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return ConversionError(f"{repo_id}: no such repo on the Hugging Face hub (or it is private: set HF_TOKEN)")
    if isinstance(e, errors.EntryNotFoundError):
        return ConversionError(f"{repo_id}: the repo has no file {what}")
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ConversionError(f"{repo_id}: downloading {what} failed ({reason})")


def _quiet_unless_terminal() -> None:
    if not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def download_snapshot(repo_id: str) -> Path:
    """Fetch (or reuse from the hub cache) the files of `repo_id` that conversion needs."""
    from huggingface_hub import errors, snapshot_download

    _quiet_unless_terminal()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS))
    except (OSError, errors.EntryNotFoundError) as e:  # hub HTTP errors and offline cache misses
        raise _download_error(repo_id, "the checkpoint", e) from None


def download_file(repo_id: str, filename: str) -> Path:
    """Fetch (or reuse from the hub cache) one file of `repo_id`, e.g. a GGUF model."""
    from huggingface_hub import errors, hf_hub_download

    _quiet_unless_terminal()
    try:
        return Path(hf_hub_download(repo_id, filename))
    except (OSError, errors.EntryNotFoundError) as e:
        raise _download_error(repo_id, filename, e) from None


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
