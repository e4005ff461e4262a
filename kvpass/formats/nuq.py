"""Non-uniform codes (``nuqB``, KVQuant): a lookup table of ``2**B`` centroids applied after each group is
normalised to [-1, 1] by its own min/max (``x = offset + half_range * lut[code]``).

The LUT comes from calibration: :func:`fit_lut` runs 1-D k-means over normalised activations, weighted by
the diagonal Fisher information when gradients are available (KVQuant's sensitivity-weighted datatype:
minimise ``sum_i F_i (A_i - Q(A_i))**2``). Without calibration the NormalFloat grid is used.
With ``channel_lut`` (calibrated per-channel keys) every head and channel has its own centroids, fitted the same
way on that channel's values alone: a 2-bit key channel whose values sit in two clusters is served far better by
its own four centroids than by one LUT shared by every channel of the layer.
Q-Norm (``:qnorm``) stores an affine correction ``(a, b)`` applied to the decoded centroids so that the
dequantized values keep the mean and standard deviation of the normalised values they came from: fitted on
calibration data and passed as ``qnorm=``, or fitted on the tensor being quantized.
"""

from __future__ import annotations

import math

import torch

from kvpass.errors import InputError
from kvpass.formats import packing
from kvpass.formats.base import Format, group_count, register_format
from kvpass.formats.uniform import grouped_range, static_nbytes, static_range

LUT_DTYPE = torch.float16


def normal_float_grid(bits: int) -> torch.Tensor:
    """The NormalFloat grid of QLoRA, generalised to ``bits``: ``2**(bits-1)`` positive and
    ``2**(bits-1) - 1`` negative quantiles of N(0, 1) plus an exact zero, scaled into [-1, 1].

    The outermost quantile is taken at ``offset = (1 - 1/(2*(2**b - 1)) + 1 - 1/(2*2**b)) / 2`` (0.9677 for
    4 bits), the choice that reproduces the published NF4 table.
    """
    n = 1 << bits
    if bits == 1:
        return torch.tensor([-1.0, 1.0])
    offset = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    half = n // 2
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    grid = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (grid / grid.abs().max()).float()


def normalize(xg: torch.Tensor, exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map each group (last axis) to [-1, 1]: returns (normalised, offset, half_range)."""
    lo, hi = grouped_range(xg, exclude)
    offset, half = (hi + lo) / 2, (hi - lo) / 2
    safe = torch.where(half > 0, half, torch.ones_like(half))
    return ((xg - offset.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp(-1, 1), offset, half


def nearest(xn: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every element (``lut`` sorted ascending)."""
    mids = (lut[1:] + lut[:-1]) / 2
    if packing.arithmetic_enabled():
        return count_below(xn, mids)
    return torch.bucketize(xn.contiguous(), mids.contiguous())


def count_below(xn: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """``bucketize(xn, mids)`` as a count of the boundaries below each value (``mids`` broadcast on a last axis):
    comparisons and a float sum, which an ONNX export (TensorRT's parser included) takes."""
    return (xn.unsqueeze(-1) > mids).float().sum(-1).long()


def fit_lut(
    samples: torch.Tensor,
    bits: int,
    weights: torch.Tensor | None = None,
    *,
    iters: int = 50,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fit ``2**bits`` centroids to normalised ``samples`` by (weighted) 1-D k-means (Lloyd's algorithm).

    ``weights`` has the shape of ``samples`` (e.g. the Fisher information ``(dLoss/dA)**2``); ``None`` gives
    plain k-means. Initialised from weighted quantiles, so the result is deterministic.
    Returns a sorted float32 LUT.
    """
    x = samples.detach().reshape(-1).double()
    if weights is None:
        w = torch.ones_like(x)
    else:
        if weights.shape != samples.shape:
            raise InputError(
                f"weights of shape {tuple(weights.shape)} do not match samples of shape {tuple(samples.shape)}; "
                "pass one weight (e.g. Fisher information) per sample"
            )
        w = weights.detach().reshape(-1).double().clamp_min(0)
    if not (torch.isfinite(x).all() and torch.isfinite(w).all()):
        raise InputError("calibration samples or weights contain NaN/inf; clean the calibration data first")
    k = 1 << bits
    order = x.argsort()
    xs, ws = x[order], w[order] + 1e-12
    cdf = ws.cumsum(0) / ws.sum()
    if init is None:
        centers = xs[torch.searchsorted(cdf, (torch.arange(k, dtype=torch.float64) + 0.5) / k).clamp_max(len(xs) - 1)]
    else:
        centers = init.double().sort().values.clone()
    for _ in range(iters):
        idx = nearest(xs, centers)
        mass = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, ws)
        total = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, ws * xs)
        new = torch.where(mass > 0, total / mass.clamp_min(1e-300), centers).sort().values
        if torch.allclose(new, centers, atol=1e-9):
            centers = new
            break
        centers = new
    return centers.float()


def fit_lut_rows(samples: torch.Tensor, bits: int, weights: torch.Tensor, *, iters: int = 50) -> torch.Tensor:
    """:func:`fit_lut` for every row of ``samples`` ``[C, N]`` at once (one LUT per head and channel): weighted
    1-D k-means from weighted quantiles, rows coded together with :func:`nearest_per_channel`'s shifted
    boundaries. A weight of 0 leaves a sample out (outliers). Returns sorted float32 ``[C, 2**bits]``."""
    if samples.shape != weights.shape or samples.ndim != 2:
        raise InputError(f"fit_lut_rows takes samples and weights of one shape [rows, n], got "
                         f"{tuple(samples.shape)} and {tuple(weights.shape)}")
    x, w = samples.detach().double(), weights.detach().double().clamp_min(0)
    if not (torch.isfinite(x).all() and torch.isfinite(w).all()):
        raise InputError("calibration samples or weights contain NaN/inf; clean the calibration data first")
    k = 1 << bits
    xs, order = x.sort(dim=1)
    ws = w.gather(1, order) + 1e-12
    cdf = ws.cumsum(1) / ws.sum(1, keepdim=True)
    q = ((torch.arange(k, dtype=torch.float64) + 0.5) / k).expand(len(x), k).contiguous()
    centers = xs.gather(1, torch.searchsorted(cdf, q).clamp_max(x.shape[1] - 1))
    as_lut = (1, 1, 1, len(x), k)  # the rows as channels of one head
    for _ in range(iters):
        idx = nearest_per_channel(xs.T.reshape(1, 1, -1, len(x)), centers.reshape(as_lut))[0, 0].T
        mass = torch.zeros_like(centers).scatter_add_(1, idx, ws)
        total = torch.zeros_like(centers).scatter_add_(1, idx, ws * xs)
        new = torch.where(mass > 0, total / mass.clamp_min(1e-300), centers).sort(dim=1).values
        done = torch.allclose(new, centers, atol=1e-9)
        centers = new
        if done:
            break
    return centers.float()


def channel_offsets(lut: torch.Tensor) -> torch.Tensor:
    """Index of every (head, channel) LUT row of a ``[1, H, 1, D, K]`` table, shaped ``[1, H, 1, D]``."""
    return torch.arange(lut.shape[1] * lut.shape[3], device=lut.device).reshape(1, lut.shape[1], 1, lut.shape[3])


def nearest_per_channel(xn: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """:func:`nearest` with one sorted LUT per head and channel (``lut`` ``[1, H, 1, D, K]``, ``xn`` in [-1, 1]
    with channels last): every channel's boundaries are shifted by 4 times its index, so one bucketize over the
    concatenated (still sorted) boundaries codes all channels at once. float64 keeps the shifted values exact
    enough for 8-bit centroids."""
    if packing.arithmetic_enabled():  # fp16 centroids: their midpoints are exact in float32
        return count_below(xn, (lut[..., 1:] + lut[..., :-1]) / 2)
    c = channel_offsets(lut).double()
    lut = lut.double()
    mids = (lut[..., 1:] + lut[..., :-1]) / 2 + 4 * c.unsqueeze(-1)
    k = lut.shape[-1]
    codes = torch.bucketize((xn.double() + 4 * c).contiguous(), mids.reshape(-1).contiguous())
    return codes - c.long() * (k - 1)


def lookup_per_channel(codes: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """``lut[head, channel, code]`` for every code (``codes`` ``[B, H, T, D]``)."""
    return lut.reshape(-1)[codes + channel_offsets(lut) * lut.shape[-1]]


def qnorm_affine(lut: torch.Tensor, values: torch.Tensor, quantized: torch.Tensor | None = None) -> torch.Tensor:
    """Q-Norm: ``(a, b)`` such that decoding ``a * lut[code] + b`` gives quantized ``values`` the mean and
    standard deviation of ``values`` themselves. Codes are still chosen against ``lut``: correcting the LUT
    itself would move the decision boundaries and undo the correction. ``quantized`` (the decoded values, same
    shape as ``values``) is required for per-channel LUTs, where a flat ``lut[nearest]`` does not apply."""
    v = values.reshape(-1).double()
    q = lut.double()[nearest(v, lut.double())] if quantized is None else quantized.reshape(-1).double()
    q_std = q.std()
    a = v.std() / q_std if q_std > 0 else torch.ones((), dtype=torch.float64)
    return torch.stack([a, v.mean() - a * q.mean()]).float()


def check_lut(lut: torch.Tensor, spec, x: torch.Tensor) -> None:
    k = 1 << spec.bits
    if spec.channel_lut:
        if x.ndim < 3:
            raise InputError(f"channel_lut codes [..., heads, tokens, channels] tensors, got shape {tuple(x.shape)}")
        want = (1, x.shape[-3], 1, x.shape[-1], k)
        if tuple(lut.shape) != want:
            raise InputError(f"a nuq{spec.bits} channel_lut needs a LUT of shape {want} (one row of {k} centroids per "
                             f"head and channel), got {tuple(lut.shape)}")
    elif lut.numel() != k:
        raise InputError(f"a nuq{spec.bits} LUT needs {k} centroids, got {lut.numel()}")


@register_format
class NUQFormat(Format):
    kind = "nuq"

    def quantize(self, x, spec, exclude, params):
        lut = params.get("lut")
        if spec.static:
            return self.quantize_static(x, spec, exclude, params)
        n = x.shape[-1]
        ng = group_count(n, spec, "reduced")
        xg = x.reshape(*x.shape[:-1], ng, n // ng)
        ex = None if exclude is None else exclude.reshape(xg.shape)
        _, offset, half = normalize(xg, ex)
        if lut is None:
            lut = normal_float_grid(spec.bits).to(x.device)
        if lut.numel() != 1 << spec.bits:
            raise InputError(f"a nuq{spec.bits} LUT needs {1 << spec.bits} centroids, got {lut.numel()}")
        lut = lut.to(LUT_DTYPE).float().sort().values
        offset16, half16 = offset.to(spec.scale_dtype), half.to(spec.scale_dtype)
        # Codes are chosen against the stored (rounded) metadata so that decoding reproduces the choice.
        safe = torch.where(half16 > 0, half16.float(), torch.ones_like(half))
        xn = (xg.float() - offset16.float().unsqueeze(-1)) / safe.unsqueeze(-1)
        codes = nearest(xn, lut)
        out = {
            "codes": packing.pack(codes.reshape(x.shape), spec.bits),
            "scale": half16,
            "zero": offset16,
            "lut": lut.to(LUT_DTYPE),
        }
        if spec.qnorm:
            affine = params.get("qnorm")
            if affine is None:
                affine = qnorm_affine(lut, xn.clamp(-1, 1) if ex is None else xn.clamp(-1, 1)[~ex])
            out["qnorm"] = affine.float().reshape(2)
        return out

    def quantize_static(self, x, spec, exclude, params):
        """Rows coded against calibrated per-channel ranges: no per-token metadata."""
        lo, hi = static_range(x, params)
        lo16, hi16 = lo.to(spec.scale_dtype), hi.to(spec.scale_dtype)
        center, half = (hi16.float() + lo16.float()) / 2, (hi16.float() - lo16.float()) / 2
        xn = ((x.float() - center) / torch.where(half > 0, half, torch.ones_like(half))).clamp(-1, 1)
        lut = params.get("lut")
        if lut is None:
            lut = normal_float_grid(spec.bits).to(x.device)
            if spec.channel_lut and x.ndim >= 3:
                lut = lut.expand(1, x.shape[-3], 1, x.shape[-1], -1)
        check_lut(lut, spec, x)
        lut = lut.to(LUT_DTYPE).float().sort(dim=-1).values
        codes = nearest_per_channel(xn, lut) if spec.channel_lut else nearest(xn, lut)
        out = {"codes": packing.pack(codes, spec.bits), "lo": lo16, "hi": hi16, "lut": lut.to(LUT_DTYPE)}
        if spec.qnorm:
            affine = params.get("qnorm")
            if affine is None:
                keep = slice(None) if exclude is None else ~exclude
                q = lookup_per_channel(codes, lut)[keep] if spec.channel_lut else None
                affine = qnorm_affine(lut, xn[keep], q)
            out["qnorm"] = affine.float().reshape(2)
        return out

    def decoded_lut(self, tensors, spec) -> torch.Tensor:
        lut = tensors["lut"].float()
        return lut * tensors["qnorm"][0] + tensors["qnorm"][1] if spec.qnorm else lut

    def dequantize(self, tensors, spec, n):
        codes = packing.unpack(tensors["codes"], spec.bits, n).long()
        lut = self.decoded_lut(tensors, spec)
        if spec.static:
            lo, hi = tensors["lo"].float(), tensors["hi"].float()
            vals = lookup_per_channel(codes, lut) if spec.channel_lut else lut[codes]
            return vals * (hi - lo) / 2 + (hi + lo) / 2
        half, offset = tensors["scale"].float(), tensors["zero"].float()
        ng = half.shape[-1]
        vals = lut[codes].reshape(*codes.shape[:-1], ng, n // ng)
        return (vals * half.unsqueeze(-1) + offset.unsqueeze(-1)).reshape(codes.shape)

    def nbytes(self, shape, spec, dtype):
        *lead, n = shape
        rows = (shape[-3] if len(shape) >= 3 else 1) * n if spec.channel_lut else 1  # one LUT per head and channel
        lut = rows * (1 << spec.bits) * torch.tensor([], dtype=LUT_DTYPE).element_size() + (8 if spec.qnorm else 0)
        if spec.static:
            return math.prod(lead) * packing.packed_len(n, spec.bits) + lut + static_nbytes(shape, spec)
        ng = group_count(n, spec, "reduced")
        meta = 2 * ng * torch.tensor([], dtype=spec.scale_dtype).element_size()
        return math.prod(lead) * (packing.packed_len(n, spec.bits) + meta) + lut
