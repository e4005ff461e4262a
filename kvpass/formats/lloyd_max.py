"""Lloyd-Max codes (``lmB``): each coordinate coded by the MSE-optimal quantizer of N(0, 1), one scale per vector.

Made for rotated vectors (``lm4:per_token:hadamard``, TurboQuant's data-oblivious codebooks): after the rotation a
vector's coordinates divided by its RMS are close to N(0, 1), so one codebook, computed here from the distribution,
serves every model without calibration. Codes are chosen against the RMS; the stored scale is then *norm
corrected* — ``|x| / |codebook[codes]|`` — so each decoded vector keeps its norm (``x ≈ scale * codebook[code]``).
"""

from __future__ import annotations

import functools
import math

import torch

from kvpass.formats import packing
from kvpass.formats.base import Format, group_count, register_format
from kvpass.formats.nuq import nearest

ITERATIONS = 20000
TOLERANCE = 1e-12


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _edges(levels: torch.Tensor) -> torch.Tensor:
    """The cell boundaries of sorted ``levels``: halfway between neighbours, and the infinite ends."""
    inf = torch.tensor([math.inf], dtype=levels.dtype)
    return torch.cat([-inf, (levels[1:] + levels[:-1]) / 2, inf])


@functools.cache
def _codebook(bits: int) -> torch.Tensor:
    """Lloyd's conditions on N(0, 1) in float64: boundaries halfway between levels, each level the mean of the
    normal between its boundaries, iterated from the normal's quantiles until nothing moves."""
    k = 1 << bits
    levels = torch.special.ndtri((torch.arange(k, dtype=torch.float64) + 0.5) / k)
    for _ in range(ITERATIONS):
        edges = _edges(levels)
        mass = torch.special.ndtr(edges[1:]) - torch.special.ndtr(edges[:-1])
        new = (_phi(edges[:-1]) - _phi(edges[1:])) / mass
        done = float((new - levels).abs().max()) < TOLERANCE
        levels = new
        if done:
            break
    return (levels - levels.flip(0)) / 2  # exactly symmetric, as the distribution is


def gaussian_codebook(bits: int) -> torch.Tensor:
    """The ``2**bits`` Lloyd-Max levels of N(0, 1), sorted (float64)."""
    return _codebook(bits).clone()


def gaussian_mse(bits: int) -> float:
    """Mean squared error of :func:`gaussian_codebook` on N(0, 1) (exact integral over each cell)."""
    levels = _codebook(bits)
    edges = _edges(levels)
    lo, hi = edges[:-1], edges[1:]
    mass = torch.special.ndtr(hi) - torch.special.ndtr(lo)
    # E[(X - c)^2; lo < X < hi] = E[X^2; cell] - 2c E[X; cell] + c^2 P(cell), with E[X^2; cell] = P + lo phi(lo) - hi phi(hi)
    def x_phi(t: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.isinf(t), torch.zeros_like(t), t * _phi(t))
    second = mass + x_phi(lo) - x_phi(hi)
    first = _phi(lo) - _phi(hi)
    return float((second - 2 * levels * first + levels * levels * mass).sum())


@functools.cache
def _codebook32(bits: int) -> torch.Tensor:
    return _codebook(bits).float()


def codebook(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The levels as the cache reads them: float32, sorted (shared: read it, never write it)."""
    return _codebook32(bits).to(device)


@register_format
class LloydMaxFormat(Format):
    kind = "lm"

    def quantize(self, x, spec, exclude, params):
        n = x.shape[-1]
        ng = group_count(n, spec, "reduced")
        xg = x.float().reshape(*x.shape[:-1], ng, n // ng)
        if exclude is not None:  # outliers are held elsewhere: they set neither the scale nor the norm
            xg = xg.masked_fill(exclude.reshape(xg.shape), 0.0)
        kept = xg.shape[-1] if exclude is None else (~exclude).reshape(xg.shape).sum(-1).clamp_min(1)
        norm = xg.norm(dim=-1)
        rms = norm / torch.as_tensor(kept, dtype=norm.dtype).sqrt()
        levels = codebook(spec.bits, x.device)
        codes = nearest(xg / torch.where(rms > 0, rms, torch.ones_like(rms)).unsqueeze(-1), levels)
        decoded = levels[codes]
        if exclude is not None:
            decoded = decoded.masked_fill(exclude.reshape(xg.shape), 0.0)
        dnorm = decoded.norm(dim=-1)
        scale = torch.where(dnorm > 0, norm / dnorm.clamp_min(1e-30), torch.zeros_like(norm))
        return {"codes": packing.pack(codes.reshape(x.shape), spec.bits), "scale": scale.to(spec.scale_dtype)}

    def dequantize(self, tensors, spec, n):
        codes = packing.unpack(tensors["codes"], spec.bits, n).long()
        scale = tensors["scale"].float()
        ng = scale.shape[-1]
        vals = codebook(spec.bits, codes.device)[codes].reshape(*codes.shape[:-1], ng, n // ng)
        return (vals * scale.unsqueeze(-1)).reshape(codes.shape)

    def scale_bound(self, amax: float, spec) -> float:
        """The largest scale inputs bounded by ``amax`` can get: a norm-corrected scale is at most the largest
        magnitude over the smallest level's."""
        return amax / float(codebook(spec.bits).abs().min())

    def nbytes(self, shape, spec, dtype):
        *lead, n = shape
        ng = group_count(n, spec, "reduced")
        return math.prod(lead) * (packing.packed_len(n, spec.bits) + ng * torch.tensor([], dtype=spec.scale_dtype).element_size())
