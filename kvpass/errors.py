"""Errors kvpass raises on bad input. Every message names the problem and the fix."""


class KVPassError(ValueError):
    """Base class of every error kvpass raises on purpose."""


class SpecError(KVPassError):
    """A quantization spec string or value that cannot be used."""


class KVPassWarning(UserWarning):
    """A result kvpass can produce but that is likely not what was wanted (a preset past its quality bound)."""


class InputError(KVPassError):
    """A tensor that cannot be quantized as given (dtype, NaN/inf, shape)."""


def is_int(value) -> bool:
    """An int that is not a bool (``True`` would pass ``isinstance(value, int)``), for checking counts and sizes."""
    return isinstance(value, int) and not isinstance(value, bool)
