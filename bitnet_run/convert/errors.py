"""The one error the converter raises for anything it does not understand."""


class ConversionError(ValueError):
    """A checkpoint the converter refuses; the message names the file or field, what was found and
    what was expected, on one line."""
