"""kvpass: low-bit KV caches for LLM inference, applied as a compiler pass."""

from kvpass import formats, ops  # noqa: F401  (ops registers the kvpass:: custom ops)
from kvpass.calibrate import Calibration, calibrate
from kvpass.compile import capture_model, compile
from kvpass.errors import InputError, KVPassError, SpecError
from kvpass.lowering import triton as _triton_lowering  # noqa: F401  (the CUDA kernel of kv_attention)
from kvpass.methods import MethodConfig, get_method, methods, register_method
from kvpass.model import KVPassModel

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "InputError",
    "KVPassError",
    "KVPassModel",
    "MethodConfig",
    "SpecError",
    "__version__",
    "calibrate",
    "capture_model",
    "compile",
    "formats",
    "get_method",
    "methods",
    "register_method",
]
