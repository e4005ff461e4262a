"""Uniform asymmetric integer codes (``intB``): ``x ≈ zero + code * scale`` with min/max ranges.

Per group of the reduced axis: ``zero = min`` and ``scale = (max - min) / (2**B - 1)``, both rounded to the
scale dtype *before* the codes are computed, so the stored metadata is what the codes were fitted to and every
element's error stays within ``scale / 2`` (plus the rounding of ``zero`` at the clamped ends).
"""

from __future__ import annotations

import math

import torch

from kvpass.formats import packing
from kvpass.formats.base import Format, group_count, register_format
from kvpass.formats.spec import QuantSpec


def grouped_range(xg: torch.Tensor, exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over the last axis of ``[..., groups, g]``, ignoring excluded elements."""
    if exclude is None:
        return xg.amin(-1), xg.amax(-1)
    lo = xg.masked_fill(exclude, math.inf).amin(-1)
    hi = xg.masked_fill(exclude, -math.inf).amax(-1)
    empty = torch.isinf(lo)  # a group made only of outliers: any range works, the outliers overwrite it
    return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)


def static_range(x: torch.Tensor, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated per-channel ``lo``/``hi`` for a ``static`` spec, broadcast against rows of ``x``."""
    from kvpass.errors import InputError

    if "lo" not in params or "hi" not in params:
        raise InputError("a 'static' spec needs calibrated per-channel ranges: pass lo= and hi= (from kvpass.calibrate)")
    return params["lo"].float(), params["hi"].float()


def static_nbytes(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """Calibrated ranges are stored per head and channel: two tensors of ``heads x channels``."""
    heads = shape[-3] if len(shape) >= 3 else 1
    return 2 * heads * shape[-1] * torch.tensor([], dtype=spec.scale_dtype).element_size()


def round_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` in ``dtype``, never below its float value: a scale rounded down (coarsely so when it is an fp16
    subnormal, below 6e-5) would push the group's maximum past the top code, where it is clipped by whole steps."""
    stored = scale.to(dtype)
    if dtype == torch.float32:
        return stored
    # chosen in float32: ONNX Runtime's CPU runs a float16 Where in float32 and drops the rounding casts around it
    return torch.where(stored.float() < scale, next_up(stored).float(), stored.float()).to(dtype)


def next_up(x: torch.Tensor) -> torch.Tensor:
    """``torch.nextafter(x, inf)`` for finite ``x >= 0`` of a 16-bit float dtype, in arithmetic that exports to
    ONNX (prims.nextafter has no ONNX function): adding 3/4 to 3/2 of an ulp rounds to exactly one ulp up."""
    info = torch.finfo(x.dtype)
    xf = x.float()
    step = torch.maximum(xf * (0.75 * info.eps), torch.full_like(xf, info.smallest_normal * info.eps))
    return (xf + step).to(x.dtype)


def safe(scale: torch.Tensor) -> torch.Tensor:
    """The scale to divide by: a constant group (scale 0) quantizes to code 0 and dequantizes to ``zero``."""
    s = scale.float()
    return torch.where(s > 0, s, torch.ones_like(s))


@register_format
class UniformFormat(Format):
    kind = "int"

    def quantize(self, x, spec, exclude, params):
        levels = (1 << spec.bits) - 1
        if spec.static:
            lo, hi = static_range(x, params)
            lo16, hi16 = lo.to(spec.scale_dtype), hi.to(spec.scale_dtype)
            step = safe((hi16.float() - lo16.float()) / levels)
            codes = torch.round((x.float() - lo16.float()) / step).clamp_(0, levels)
            return {"codes": packing.pack(codes, spec.bits), "lo": lo16, "hi": hi16}
        n = x.shape[-1]
        ng = group_count(n, spec, "reduced")
        xg = x.reshape(*x.shape[:-1], ng, n // ng)
        ex = None if exclude is None else exclude.reshape(xg.shape)
        lo, hi = grouped_range(xg, ex)
        zero = lo.to(spec.scale_dtype)
        scale = round_up((hi - zero.float()) / levels, spec.scale_dtype)
        codes = torch.round((xg - zero.float().unsqueeze(-1)) / safe(scale).unsqueeze(-1)).clamp_(0, levels)
        return {
            "codes": packing.pack(codes.reshape(x.shape), spec.bits),
            "scale": scale,
            "zero": zero,
        }

    def dequantize(self, tensors, spec, n):
        codes = packing.unpack(tensors["codes"], spec.bits, n).float()
        if spec.static:
            lo, hi = tensors["lo"].float(), tensors["hi"].float()
            return codes * safe((hi - lo) / ((1 << spec.bits) - 1)) + lo
        scale, zero = tensors["scale"].float(), tensors["zero"].float()
        ng = scale.shape[-1]
        cg = codes.reshape(*codes.shape[:-1], ng, n // ng)
        return torch.addcmul(zero.unsqueeze(-1), cg, scale.unsqueeze(-1)).reshape(codes.shape)

    def nbytes(self, shape, spec, dtype):
        *lead, n = shape
        vectors = math.prod(lead)
        if spec.static:
            return vectors * packing.packed_len(n, spec.bits) + static_nbytes(shape, spec)
        ng = group_count(n, spec, "reduced")
        meta = 2 * ng * torch.tensor([], dtype=spec.scale_dtype).element_size()
        return vectors * (packing.packed_len(n, spec.bits) + meta)
