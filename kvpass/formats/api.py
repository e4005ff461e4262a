"""The public quantization API: :func:`quantize`, :class:`QuantizedTensor`, :func:`expected_nbytes`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvpass.formats import outliers, rotation
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
    x: torch.Tensor, spec: str | QuantSpec, *, check: bool = True, **params: torch.Tensor
) -> QuantizedTensor:
    """Quantize ``x`` (``[..., tokens, channels]``) with ``spec`` and return every stored tensor.

    ``params`` pass calibrated state to the format: ``lut=`` (nuq centroids), ``qnorm=`` (its Q-Norm affine),
    ``scale=`` (a static fp8 scale), ``lo=``/``hi=`` (per-channel ranges for ``static`` specs, broadcastable
    to ``x``; channels last), ``sens=`` (per-channel weights of the coding error that picks a static spec's
    outliers).
    ``check=False`` skips the NaN/inf scan (for hot paths whose inputs were checked upstream).
    """
    spec = parse_spec(spec)
    if check:
        validate_input(x, spec)
    fmt = get_format(spec)
    params = dict(params)
    if spec.rotate:
        return QuantizedTensor(spec, x.shape, x.dtype, quantize_rotated(x, spec, fmt, params))
    xv = to_vector_last(x, spec)
    sens = params.pop("sens", None)
    if spec.outlier_frac and spec.static:
        return QuantizedTensor(spec, x.shape, x.dtype, quantize_static_outliers(xv, spec, fmt, sens, params))
    exclude = None
    stored: dict[str, torch.Tensor] = {}
    if spec.outlier_frac:
        stored, exclude = outliers.split(xv, spec.outlier_frac)
    stored = {**fmt.quantize(xv, spec, exclude, params), **stored}
    return QuantizedTensor(spec, x.shape, x.dtype, stored)


def quantize_rotated(x: torch.Tensor, spec: QuantSpec, fmt, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``:hadamard``: outliers (the largest values of each vector) are kept before the rotation, which would spread
    them over every coordinate; the rest (outliers zeroed) is rotated and coded, and decodes to what the outliers
    are added onto."""
    stored: dict[str, torch.Tensor] = {}
    if spec.outlier_frac:
        stored, exclude = outliers.split(x, spec.outlier_frac)
        x = x.masked_fill(exclude, 0.0)
    return {**fmt.quantize(rotation.rotate(x), spec, None, params), **stored}


def quantize_static_outliers(xv: torch.Tensor, spec: QuantSpec, fmt, sens: torch.Tensor | None,
                             params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense-and-sparse against calibrated ranges: every element is coded on its own, so each vector keeps as
    outliers the elements whose coding costs most, ``sens * (x - Q(x))**2`` with ``sens`` the calibrated mean
    Fisher information of each head and channel (KVQuant's sensitivity; 1 without calibration). On 2-bit keys
    this beat keeping the values furthest from their channel's centre (a magnitude rule)."""
    dense = fmt.quantize(xv, spec, None, params)
    err = xv.float() - fmt.dequantize(dense, spec, xv.shape[-1]).float()
    score = err.square() if sens is None else err.square() * sens.float()
    stored, exclude = outliers.split(xv, spec.outlier_frac, score)
    if spec.qnorm and "qnorm" not in params:  # an uncalibrated Q-Norm is fitted without the outliers
        dense = fmt.quantize(xv, spec, exclude, params)
    return {**dense, **stored}


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Dense tensor of ``q``'s original shape and dtype."""
    spec = q.spec
    n = vector_last_shape(tuple(q.shape), spec)[-1]
    dense = get_format(spec).dequantize(q.tensors, spec, n)
    if spec.rotate:
        dense = rotation.unrotate(dense)
    if spec.outlier_frac:
        dense = outliers.merge(dense, q.tensors, add=spec.rotate)
    if transposed(spec):
        dense = dense.transpose(-1, -2)
    return dense.to(q.dtype)


def expected_nbytes(shape: tuple[int, ...], spec: str | QuantSpec, dtype: torch.dtype = torch.float16) -> int:
    """Closed-form bytes of quantizing a tensor of ``shape`` and ``dtype`` with ``spec``."""
    spec = parse_spec(spec)
    vshape = vector_last_shape(tuple(shape), spec)
    total = get_format(spec).nbytes(vshape, spec, dtype)
    if spec.outlier_frac:
        total += outliers.nbytes(vshape, spec.outlier_frac, dtype)
    return total
