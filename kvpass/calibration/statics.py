"""Fitting a cache's static tensors from recorded activations: calibrated per-channel ranges (the ``f/2`` and
``1 - f/2`` quantiles per head and channel when ``f`` of the values are outliers, else min and max), Fisher-weighted
k-means LUTs and the Q-Norm correction."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvpass.calibration.store import CalibKey
from kvpass.formats import fit_lut, outliers
from kvpass.formats.nuq import fit_lut_rows, lookup_per_channel, nearest_per_channel, normalize, qnorm_affine
from kvpass.kvcache import CacheSpec

if TYPE_CHECKING:
    from kvpass.methods.base import MethodConfig

MAX_FIT_SAMPLES = 200_000


def subsample(x: torch.Tensor, w: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = x.reshape(-1), w.reshape(-1)
    if x.numel() <= MAX_FIT_SAMPLES:
        return x, w
    idx = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))[:MAX_FIT_SAMPLES]
    return x[idx], w[idx]


def fit_statics(cs: CacheSpec, act: torch.Tensor, fisher: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Static tensors of one cache from activations ``[N, H, T, D]`` and their Fisher weights. The first
    ``cs.sink`` tokens of each sample are left out: they are stored at model precision, and the first token's
    keys are often far outside every other token's range."""
    spec, out = cs.format, {}
    act, fisher = act[:, :, cs.sink:], fisher[:, :, cs.sink:]
    x = act.permute(1, 0, 2, 3).reshape(act.shape[1], -1, act.shape[-1])  # [H, N*T, D]
    w = fisher.permute(1, 0, 2, 3).reshape_as(x)
    if spec.static:
        f = spec.outlier_frac
        lo = torch.quantile(x, f / 2, dim=1) if f else x.amin(1)
        hi = torch.quantile(x, 1 - f / 2, dim=1) if f else x.amax(1)
        out["lo"] = lo[None, :, None, :].to(spec.scale_dtype)
        out["hi"] = hi[None, :, None, :].to(spec.scale_dtype)
        if f:
            out["sens"] = sensitivity(w)
    if spec.kind != "nuq":
        return out
    if spec.static:
        center, half = (out["hi"].float() + out["lo"].float())[0] / 2, (out["hi"].float() - out["lo"].float())[0] / 2
        xn = ((x - center) / half.clamp_min(1e-12)).clamp(-1, 1)  # [H, N*T, D]
        keep = torch.ones_like(xn, dtype=torch.bool)
        if spec.outlier_frac:
            score = (x - center).abs() / half.clamp_min(1e-12)
            _, picked = outliers.split(x, spec.outlier_frac, score)
            keep = ~picked
        if spec.channel_lut:
            return out | channel_luts(spec, xn, w, keep, seed)
    else:
        exclude = None
        if spec.outlier_frac:
            _, exclude = outliers.split(x, spec.outlier_frac)
        g = spec.group or x.shape[-1]
        xg = x.reshape(*x.shape[:-1], -1, g)
        xn, _, _ = normalize(xg, None if exclude is None else exclude.reshape(xg.shape))
        xn = xn.reshape(x.shape)
        keep = torch.ones_like(xn, dtype=torch.bool) if exclude is None else ~exclude
    samples, weights = subsample(xn[keep], w[keep], seed)
    lut = fit_lut(samples, spec.bits, weights)
    out["lut"] = lut.to(torch.float16)
    if spec.qnorm:
        out["qnorm"] = qnorm_affine(lut.half().float(), samples)
    return out


def sensitivity(w: torch.Tensor) -> torch.Tensor:
    """Mean Fisher information of each head and channel (``w`` ``[H, M, D]``) over the layer's mean, as fp16
    ``[1, H, 1, D]``: the weight of each channel's coding error when a vector picks its outliers."""
    mean = w.mean(1)
    return (mean / mean.mean().clamp_min(1e-30)).clamp(1e-4, 1e4)[None, :, None, :].half()


def channel_luts(spec, xn: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """One LUT per head and channel from normalised values ``[H, M, D]``, their Fisher weights and the mask of
    non-outliers, as ``[1, H, 1, D, 2**B]``, with the layer's Q-Norm fitted over every channel's decoded values."""
    h, m, d = xn.shape
    if m > MAX_FIT_SAMPLES // 4:  # the same tokens for every channel keeps the rows rectangular
        cols = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:MAX_FIT_SAMPLES // 4]
        xn, w, keep = xn[:, cols], w[:, cols], keep[:, cols]
    weights = (w * keep).permute(0, 2, 1).reshape(h * d, -1)  # weight 0 leaves an outlier out
    lut = fit_lut_rows(xn.permute(0, 2, 1).reshape(h * d, -1), spec.bits, weights).reshape(1, h, 1, d, -1).half()
    out = {"lut": lut}
    if spec.qnorm:
        rows_in = xn.unsqueeze(0)  # [1, H, M, D]: tokens as rows
        q = lookup_per_channel(nearest_per_channel(rows_in, lut.float()), lut.float())
        # the outlier mask, not the weights: a token with zero Fisher information (the last one of each sample,
        # whose logits are not scored) is still a value Q-Norm must match
        out["qnorm"] = qnorm_affine(lut.float(), rows_in[keep[None]], q[keep[None]])
    return out


def fit_recorded(acts: dict[str, list[torch.Tensor]], layers: list[int], method: MethodConfig, seed: int = 0,
                 fisher_weights: bool = True, promoted: tuple[int, ...] = ()) -> dict[CalibKey, torch.Tensor]:
    """Every layer's static key and value tensors fitted from :func:`record`'s output, for the layer's spec
    (``sensitive_spec`` in the ``promoted`` layers). ``fisher_weights=False`` fits the LUTs by plain k-means (every
    sample weighted 1)."""
    tensors: dict[CalibKey, torch.Tensor] = {}
    for layer in layers:
        for which in ("k", "v"):
            act = torch.stack(acts[f"{layer}.{which}"])  # [N, H, T, D]
            fisher = torch.stack(acts[f"{layer}.{which}.fisher"])
            if not fisher_weights:
                fisher = torch.ones_like(fisher)
            spec = method.key_spec if which == "k" else method.value_spec
            for name, t in fit_statics(spec(act.shape[-1], layer, promoted), act, fisher, seed).items():
                tensors[CalibKey(layer, which, name)] = t.contiguous()
    return tensors
