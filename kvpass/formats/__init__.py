"""Quantization formats with real bit packing.

>>> from kvpass import formats
>>> q = formats.quantize(torch.randn(2, 8, 128, 64), "int4:per_token:g64")
>>> q.dequantize().shape, q.nbytes, q.bits_per_element
"""

from kvpass.formats import fp8, lloyd_max, nuq, uniform  # noqa: F401  (registers the formats)
from kvpass.formats.api import QuantizedTensor, dequantize, expected_nbytes, quantize
from kvpass.formats.base import Format, get_format, register_format
from kvpass.formats.nuq import fit_lut, normal_float_grid
from kvpass.formats.spec import QuantSpec, parse_spec

EXAMPLES = {
    "int8": "int8:per_token",
    "int4": "int4:per_token:g64",
    "int3": "int3:per_token:g64",
    "int2": "int2:per_token:g64",
    "int1": "int1:per_token:g32",
    "int4-per-channel": "int4:per_channel:g32",
    "int2+outliers": "int2:per_token:g64+outliers1%",
    "nuq4": "nuq4:per_token",
    "nuq3": "nuq3:per_token",
    "nuq2-qnorm": "nuq2:per_token:qnorm",
    "nuq3+outliers": "nuq3:per_token+outliers1%",
    "lm4-hadamard": "lm4:per_token:hadamard",
    "lm3-hadamard": "lm3:per_token:hadamard",
    "fp8_e4m3": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2",
    "fp16": "fp16",
    "bf16": "bf16",
}


def available() -> dict[str, str]:
    """Named example specs of every registered format (name -> spec string). Any spec the grammar in
    :mod:`kvpass.formats.spec` accepts works, not only these."""
    return dict(EXAMPLES)


__all__ = [
    "Format",
    "QuantSpec",
    "QuantizedTensor",
    "available",
    "dequantize",
    "expected_nbytes",
    "fit_lut",
    "get_format",
    "normal_float_grid",
    "parse_spec",
    "quantize",
    "register_format",
]
