"""The public quantization API: :func:`quantize`, :class:`QuantizedTensor`, :func:`expected_nbytes`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvpass.formats import outliers
from kvpass.formats.base import get_format, validate_input
from kvpass.formats.spec import QuantSpec, parse_spec


@dataclass
class QuantizedTensor:
    """A quantized tensor: every stored tensor (packed codes, scales, zero points, outliers, LUTs).

    ``tensors`` holds exactly what would be kept in memory; nothing dense of the original shape is kept.
    For per-channel specs the stored tensors are laid out with tokens last (``[..., channels, tokens]``),
    so every reduction runs over the last axis.
    """

    spec: QuantSpec
    shape: torch.Size
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        """The dense tensor these codes stand for, in the original dtype and shape."""
        return dequantize(self)

    @property
    def nbytes(self) -> int:
        """Exact bytes of every stored tensor."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_element(self) -> float:
        """Stored bits per element of the original tensor, metadata included."""
        return 8.0 * self.nbytes / max(1, math.prod(self.shape))



def transposed(spec: QuantSpec) -> bool:
    """Per-channel vectors run along the token axis and are moved last, so every format reduces over -1; with
    static (calibrated) ranges nothing is reduced and tokens stay rows."""
    return spec.granularity == "per_channel" and not spec.static


def to_vector_last(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return x.transpose(-1, -2).contiguous() if transposed(spec) else x


def vector_last_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    if transposed(spec):
        return (*shape[:-2], shape[-1], shape[-2])
    return tuple(shape)


def quantize(
    x: torch.Tensor, spec: "str | QuantSpec", *, check: bool = True, **params: torch.Tensor
) -> QuantizedTensor:
    """Quantize ``x`` (``[..., tokens, channels]``) with ``spec`` and return every stored tensor.

    ``params`` pass calibrated state to the format: ``lut=`` (nuq centroids), ``qnorm=`` (its Q-Norm affine),
    ``scale=`` (a static fp8 scale), ``lo=``/``hi=`` (per-channel ranges for ``static`` specs, broadcastable
    to ``x``; channels last).
    ``check=False`` skips the NaN/inf scan (for hot paths whose inputs were checked upstream).
    """
    spec = parse_spec(spec)
    if check:
        validate_input(x, spec)
    fmt = get_format(spec)
    xv = to_vector_last(x, spec)
    exclude = None
    stored: dict[str, torch.Tensor] = {}
    if spec.outlier_frac:
        score = None
        if spec.static and "lo" in params and "hi" in params:
            # with calibrated ranges an outlier is what lies furthest outside its own channel's range
            lo, hi = params["lo"].float(), params["hi"].float()
            score = (xv.float() - (hi + lo) / 2).abs() / ((hi - lo) / 2).clamp_min(1e-12)
        stored, exclude = outliers.split(xv, spec.outlier_frac, score)
    stored = {**fmt.quantize(xv, spec, exclude, params), **stored}
    return QuantizedTensor(spec, x.shape, x.dtype, stored)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Dense tensor of ``q``'s original shape and dtype."""
    spec = q.spec
    n = vector_last_shape(tuple(q.shape), spec)[-1]
    dense = get_format(spec).dequantize(q.tensors, spec, n)
    if spec.outlier_frac:
        dense = outliers.merge(dense, q.tensors)
    if transposed(spec):
        dense = dense.transpose(-1, -2)
    return dense.to(q.dtype)


def expected_nbytes(shape: tuple[int, ...], spec: "str | QuantSpec", dtype: torch.dtype = torch.float16) -> int:
    """Closed-form bytes of quantizing a tensor of ``shape`` and ``dtype`` with ``spec``."""
    spec = parse_spec(spec)
    vshape = vector_last_shape(tuple(shape), spec)
    total = get_format(spec).nbytes(vshape, spec, dtype)
    if spec.outlier_frac:
        total += outliers.nbytes(vshape, spec.outlier_frac, dtype)
    return total
