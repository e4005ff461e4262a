"""kvpass: low-bit KV caches for LLM inference, applied as a compiler pass."""

from kvpass import formats, ops  # noqa: F401  (ops registers the kvpass:: custom ops)
from kvpass.calibration.calibrate import calibrate
from kvpass.calibration.store import Calibration
from kvpass.compile import compile
from kvpass.errors import InputError, KVPassError, KVPassWarning, SpecError
from kvpass.lowering import cpu as _cpu_lowering  # noqa: F401  (the native CPU kernel of kv_attention)
from kvpass.lowering import triton as _triton_lowering  # noqa: F401  (the CUDA kernel of kv_attention)
from kvpass.lowering.onnx import export_onnx
from kvpass.methods import MethodConfig, get_method, methods, register_method
from kvpass.model import KVPassModel
from kvpass.pipeline.capture import capture_model

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "InputError",
    "KVPassError",
    "KVPassModel",
    "KVPassWarning",
    "MethodConfig",
    "SpecError",
    "__version__",
    "calibrate",
    "capture_model",
    "compile",
    "export_onnx",
    "formats",
    "get_method",
    "methods",
    "register_method",
]
