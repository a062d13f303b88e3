"""bitnet-run: a CPU inference runtime for ternary (BitNet b1.58) language models.

The whole Python API is `Model` (load a packed .bnr file, then tokenize / logits / stream_generate
and the generate / stream / chat built on it; `new_context()` for another cache on the same weights);
`bitnet_run.convert` turns Hugging Face checkpoints into .bnr files.
"""
from importlib import metadata as _metadata

from .errors import BitNetError, ContextOverflowError, ModelFileError

try:
    __version__ = _metadata.version("bitnet-run")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["Model", "load", "BitNetError", "ContextOverflowError", "ModelFileError", "__version__"]


def __getattr__(name):
    # The C extension loads only when a model is needed, so the converter and `bitnet-run --help`
    # work without it.
    if name in ("Model", "load"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'bitnet_run' has no attribute {name!r}")
