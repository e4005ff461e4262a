"""FP8 codes (``fp8_e4m3``, ``fp8_e5m2``), the production baseline of vLLM and TensorRT-LLM.

``x ≈ scale * fp8(x / scale)`` with ``scale = amax / fp8_max`` per head (axis -3 of ``[B, H, T, D]``; the
whole tensor when it has fewer axes), per token or per tensor. Values are clamped to the fp8 range before
the cast, so finite input never becomes NaN or inf. The codes are stored as their raw bytes (uint8).
"""

from __future__ import annotations

import math

import torch

from kvpass.formats.base import Format, register_format
from kvpass.formats.spec import FLOAT_DTYPES, FP8_VARIANTS, QuantSpec
from kvpass.formats.uniform import round_up


def amax_axes(ndim: int, granularity: str) -> tuple[int, ...]:
    """Axes reduced for the scale; the layout is vector-last and per_channel never reaches fp8."""
    if granularity == "per_token":
        return (ndim - 1,)
    if granularity == "per_head" and ndim >= 3:
        return tuple(a for a in range(ndim) if a != ndim - 3)
    return tuple(range(ndim))


@register_format
class FP8Format(Format):
    kind = "fp8"

    def quantize(self, x, spec, exclude, params):
        fp8 = FP8_VARIANTS[spec.fp8_variant]
        fmax = torch.finfo(fp8).max
        scale = params.get("scale")
        if scale is None:
            amax = x.float().abs().amax(dim=amax_axes(x.ndim, spec.granularity), keepdim=True)
            scale = round_up(amax / fmax, spec.scale_dtype)  # rounded up: a tiny tensor keeps a nonzero scale
        s = scale.float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        codes = (x.float() / s).clamp(-fmax, fmax).to(fp8).view(torch.uint8)
        return {"codes": codes, "scale": scale}

    def dequantize(self, tensors, spec, n):
        fp8 = FP8_VARIANTS[spec.fp8_variant]
        return tensors["codes"].view(fp8).float() * tensors["scale"].float()

    def nbytes(self, shape, spec, dtype):
        ndim = len(shape)
        kept = [1 if a in amax_axes(ndim, spec.granularity) else d for a, d in enumerate(shape)]
        return math.prod(shape) + math.prod(kept) * torch.tensor([], dtype=spec.scale_dtype).element_size()


@register_format
class FloatFormat(Format):
    """No quantization: the values in a float dtype (``fp16``, ``bf16``, ``fp32``, or the input's for ``none``)."""

    kind = "float"

    def quantize(self, x, spec, exclude, params):
        return {"data": x.to(self.dtype(spec, x.dtype))}

    def dequantize(self, tensors, spec, n):
        return tensors["data"]

    def nbytes(self, shape, spec, dtype):
        return math.prod(shape) * torch.tensor([], dtype=self.dtype(spec, dtype)).element_size()

    @staticmethod
    def dtype(spec: QuantSpec, input_dtype: torch.dtype) -> torch.dtype:
        return FLOAT_DTYPES[spec.float_dtype] if spec.float_dtype else input_dtype
