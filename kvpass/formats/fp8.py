"""FP8 codes (``fp8_e4m3``, ``fp8_e5m2``), the production baseline of vLLM and TensorRT-LLM.

``x ≈ scale * fp8(x / scale)`` with ``scale = amax / fp8_max`` per head (axis -3 of ``[B, H, T, D]``; the
whole tensor when it has fewer axes), per token or per tensor. Values are clamped to the fp8 range before
the cast, so finite input never becomes NaN or inf. The codes are stored as their raw bytes (uint8).
"""

from __future__ import annotations

import math

import torch

from kvpass.formats import packing
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
        scaled = (x.float() / s).clamp(-fmax, fmax)
        codes = fp8_bytes(scaled, fp8) if packing.arithmetic_enabled() else scaled.to(fp8).view(torch.uint8)
        return {"codes": codes, "scale": scale}

    def dequantize(self, tensors, spec, n):
        fp8 = FP8_VARIANTS[spec.fp8_variant]
        codes = tensors["codes"]
        if packing.arithmetic_enabled():  # a 256-entry table: no bit reinterpretation to export
            values = byte_values(fp8, codes.device)[codes.long()]
        else:
            values = codes.view(fp8).float()
        return values * tensors["scale"].float()

    def nbytes(self, shape, spec, dtype):
        ndim = len(shape)
        kept = [1 if a in amax_axes(ndim, spec.granularity) else d for a, d in enumerate(shape)]
        return math.prod(shape) + math.prod(kept) * torch.tensor([], dtype=spec.scale_dtype).element_size()


# computed at import, so that a traced graph holds the table as a constant rather than the ops that made it
_BYTE_VALUES = {fp8: torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8).float().tolist()
                for fp8 in set(FP8_VARIANTS.values())}


def byte_values(fp8: torch.dtype, device=None) -> torch.Tensor:
    """The float32 value of each of the 256 bytes of an fp8 dtype."""
    return torch.tensor(_BYTE_VALUES[fp8], dtype=torch.float32, device=device)


def fp8_bytes(x: torch.Tensor, fp8: torch.dtype) -> torch.Tensor:
    """``x.to(fp8).view(torch.uint8)`` for finite ``x`` within the fp8 range, by arithmetic on the rounded value (the
    ONNX export has no bit reinterpretation): sign, exponent by comparisons with powers of two, exact mantissa."""
    info = torch.finfo(fp8)
    man_bits = -int(math.log2(info.eps))
    emin = int(math.log2(info.smallest_normal))
    emax = int(math.log2(info.max))
    v = x.to(fp8).float()
    a = v.abs()
    e = torch.full_like(a, float(emin))
    inv = torch.full_like(a, 2.0 ** -emin)  # 2**-e, built from exact halvings
    for k in range(emin + 1, emax + 1):
        above = a >= 2.0 ** k
        e = e + above.float()
        inv = inv * torch.where(above, 0.5, 1.0)
    normal = a >= 2.0 ** emin
    mantissa = torch.where(normal, (a * inv - 1.0) * 2 ** man_bits, a * 2.0 ** (man_bits - emin))
    field = torch.where(normal, e - emin + 1, torch.zeros_like(e))
    sign = (1.0 / x) < 0  # also for -0.0, which fp8 keeps
    byte = sign.float() * 128 + field * 2 ** man_bits + mantissa
    return byte.to(torch.int32).to(torch.uint8)


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
