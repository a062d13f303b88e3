"""Exceptions raised by bitnet_run. Every message is one line naming what was wrong."""


class BitNetError(RuntimeError):
    """A failure reported by the C runtime."""


class ModelFileError(BitNetError, ValueError):
    """The model file is missing, truncated, corrupted or of an unsupported kind."""


class ContextOverflowError(BitNetError, ValueError):
    """The tokens do not fit in the context window."""
