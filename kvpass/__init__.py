"""kvpass: low-bit KV caches for LLM inference, applied as a compiler pass."""

from kvpass import formats
from kvpass.errors import InputError, KVPassError, SpecError

__version__ = "0.1.0"

__all__ = ["InputError", "KVPassError", "SpecError", "formats", "__version__"]
