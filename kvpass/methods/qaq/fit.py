"""QAQ's calibration: each token's formula numerators from recorded queries, keys and values, the eps that
meets the target bits, and each tier's share of tokens."""

from __future__ import annotations

from dataclasses import replace

import torch

from kvpass.calibration.statics import fit_statics
from kvpass.calibration.store import CalibKey
from kvpass.errors import KVPassError
from kvpass.kvcache import parse_cache_spec, static_names
from kvpass.methods.qaq.config import QAQConfig, fixed_nbytes, map_bits, tier_cost
from kvpass.methods.qaq.formulas import bits_for, key_numerator, quantile_norm, to_tier, token_range, value_numerator
from kvpass.ops.attention import attention_probs


def sensitivities(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: QAQConfig,
                  stored_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For one sequence of one layer (``q`` ``[Hq, T, D]``, ``k``/``v`` ``[Hkv, T, D]``, after RoPE): the
    numerators ``a`` of the key and value formulas (``bits = ceil(log2(1 + a / eps))``) of every token ``[Hkv, T]``,
    as the op computes them when the token leaves the window. ``stored_k``: the keys as stored (before RoPE), whose
    ranges the key formula takes; ``k`` by default."""
    hq, t, d = q.shape
    hkv = k.shape[0]
    groups = hq // hkv
    probs = attention_probs(q, k, None, torch.arange(t), scale)  # [Hq, T, T]
    alpha = torch.zeros(hq, t)
    for o in range(config.window):  # query i + o attending token i
        diag = torch.diagonal(probs, offset=-o, dim1=-2, dim2=-1)  # [Hq, T - o]
        alpha[:, :t - o] = torch.maximum(alpha[:, :t - o], diag)
    alpha = alpha.reshape(hkv, groups, t).amax(1)
    logn = q.float().norm(dim=-1).clamp_min(1e-6).log().reshape(hkv, groups, t)
    # the query statistics the op holds when token i is decided: queries up to i + window - 1
    cum = lambda x: x.sum(1).cumsum(-1)
    stats = torch.stack([cum(torch.ones_like(logn)), cum(logn), cum(logn**2)], -1)  # [Hkv, T, 3]
    at = torch.clamp(torch.arange(t) + config.window - 1, max=t - 1)
    qn = quantile_norm(stats[:, at], config.quantile)
    stored_k = k if stored_k is None else stored_k
    return key_numerator(alpha, token_range(stored_k), qn, d), value_numerator(alpha, token_range(v))


def tier_of(num: torch.Tensor, eps: float, tiers: tuple[int, ...]) -> torch.Tensor:
    return to_tier(bits_for(num, eps), tiers)


def _average(num_k: list[torch.Tensor], num_v: list[torch.Tensor], config: QAQConfig, dk: int, dv: int,
             dtype: torch.dtype, shared_bits: float):
    """The average stored bits of the tiers' tokens as a function of eps, and the bits per element counted on top
    of them (the tier map, what every layer shares, and with ``target_context`` the fixed bytes)."""
    ck, cv = tier_cost(config, dk, which="k"), tier_cost(config, dv, which="v")
    nk, nv = torch.cat([x.reshape(-1) for x in num_k]), torch.cat([x.reshape(-1) for x in num_v])
    bits = config.tier_bits

    def average(eps: float) -> float:
        return float((ck[tier_of(nk, eps, bits)].mean() * dk + cv[tier_of(nv, eps, bits)].mean() * dv) / (dk + dv))

    overhead = shared_bits + (map_bits(dk) * dk + map_bits(dv) * dv) / (dk + dv)
    if config.target_context:
        fixed = fixed_nbytes(config, dk, "k", dtype) + fixed_nbytes(config, dv, "v", dtype)
        overhead += 8.0 * fixed / (config.target_context * (dk + dv))
    return average, overhead


def reachable(acts: dict[str, list[torch.Tensor]], nums: dict[int, tuple[torch.Tensor, torch.Tensor]],
              config: QAQConfig, dtype: torch.dtype = torch.float16) -> tuple[float, float]:
    """The least and most ``target_bits`` these tiers can average over every layer's calibration tokens."""
    layers = list(nums)
    _, _, dk = acts[f"{layers[0]}.k"][0].shape
    dv = acts[f"{layers[0]}.v"][0].shape[-1]
    average, overhead = _average([n[0] for n in nums.values()], [n[1] for n in nums.values()], config, dk, dv, dtype,
                                 _shared_bits(acts, layers))
    return average(1e30) + overhead, average(1e-30) + overhead


def _shared_bits(acts: dict[str, list[torch.Tensor]], layers: list[int]) -> float:
    """Keys stored before RoPE: one int32 position id per slot, shared by every layer (kvpass.pipeline.rope)."""
    hkv, _, dk = acts[f"{layers[0]}.k"][0].shape
    dv = acts[f"{layers[0]}.v"][0].shape[-1]
    return 32.0 / (len(layers) * hkv * (dk + dv)) if f"{layers[0]}.k_rope" in acts else 0.0


def solve(num_k: list[torch.Tensor], num_v: list[torch.Tensor], config: QAQConfig, dk: int, dv: int,
          dtype: torch.dtype = torch.float16, shared_bits: float = 0.0) -> float:
    """The ``eps`` at which the calibration tokens average ``config.target_bits`` per element (bisection on log
    eps; the average falls as eps grows); with ``target_context`` the fixed bytes of a head's cache (at the model's
    ``dtype``) are taken off the target first. ``shared_bits``: bits per element of what the cache holds once for
    every layer (the position id of each slot when keys are stored before RoPE), also taken off."""
    average, overhead = _average(num_k, num_v, config, dk, dv, dtype, shared_bits)
    target = config.target_bits - overhead
    lowest, highest = average(1e30), average(1e-30)
    if not lowest <= target <= highest:
        near = (lowest + 0.05 if target < lowest else highest - 0.05) + config.target_bits - target
        raise KVPassError(
            f"QAQ target_bits={config.target_bits} is outside what these tiers can average: "
            f"{lowest + config.target_bits - target:.2f} to {highest + config.target_bits - target:.2f} bits per element "
            f"(tier map included{', window and calibrated tensors at target_context' if config.target_context else ''}"
            "); choose a target in that range, e.g. dataclasses.replace(method, qaq=dataclasses.replace(method.qaq, "
            f"target_bits={near:.2f})), or "
            "other tiers (a small head dim makes the tier map and window cost more bits per element)")
    lo, hi = -30.0, 30.0  # log10 eps
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if average(10**mid) < target else (mid, hi)
    return 10**hi


def shares(num: torch.Tensor, eps: float, tiers: tuple[int, ...]) -> torch.Tensor:
    """Fraction of tokens in each tier at ``eps``."""
    counts = torch.bincount(tier_of(num.reshape(-1), eps, tiers), minlength=len(tiers)).float()
    return counts / counts.sum()


def numerators(acts: dict[str, list[torch.Tensor]], layers: list[int], config: QAQConfig
               ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the key and value formula numerators of every calibration token (:func:`sensitivities`)."""
    nums = {}
    for layer in layers:
        scale = float(acts[f"{layer}.scale"][0])
        rotated = acts.get(f"{layer}.k_rope", acts[f"{layer}.k"])  # what attends (keys may be stored before RoPE)
        pairs = [sensitivities(q, k_rope, v, scale, config, stored_k=k)
                 for q, k_rope, k, v in zip(acts[f"{layer}.q"], rotated, acts[f"{layer}.k"], acts[f"{layer}.v"])]
        nums[layer] = tuple(torch.stack(x) for x in zip(*pairs))
    return nums


def solve_shares(acts: dict[str, list[torch.Tensor]], nums: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 config: QAQConfig, dtype: torch.dtype = torch.float16
                 ) -> tuple[dict[CalibKey, torch.Tensor], dict[int, float]]:
    """Each layer's eps (given, or solved for the target bits over every layer, or over each layer alone with
    ``per_layer_eps``) and its share of tokens per tier for keys and values."""
    layers = list(nums)
    _, _, dk = acts[f"{layers[0]}.k"][0].shape
    dv = acts[f"{layers[0]}.v"][0].shape[-1]
    shared = _shared_bits(acts, layers)
    groups = [[layer] for layer in layers] if config.per_layer_eps else [layers]
    eps = {}
    for group in groups:
        e = config.eps or solve([nums[i][0] for i in group], [nums[i][1] for i in group], config, dk, dv, dtype,
                                shared)
        eps |= dict.fromkeys(group, e)
    return {CalibKey(layer, which, "tier_share"): shares(num, eps[layer], config.tier_bits)
            for layer, pair in nums.items() for which, num in zip("kv", pair)}, eps


def eps_meta(eps: dict[int, float]) -> dict:
    """A calibration's meta entries for the layers' eps: ``"eps"`` (one for the model, or the geometric mean of the
    layers'), and ``"layer_eps"`` when the layers differ."""
    values = torch.tensor(list(eps.values()), dtype=torch.float64)
    meta = {"eps": float(values.log().mean().exp())}
    if len(set(eps.values())) > 1:
        meta["layer_eps"] = {str(layer): e for layer, e in eps.items()}
    return meta


def fit_qaq(acts: dict[str, list[torch.Tensor]], layers: list[int], config, seed: int = 0,
            dtype: torch.dtype = torch.float16, nums: dict | None = None
            ) -> tuple[dict[CalibKey, torch.Tensor], dict[int, float]]:
    """QAQ's eps per layer (:func:`solve_shares`), each layer's share of tokens per tier for keys and values, and
    the calibrated tensors (ranges, LUTs) of the key and value tiers that have them. ``nums``: the layers' :func:`numerators`, when already computed."""
    nums = numerators(acts, layers, config) if nums is None else nums
    tensors, eps = solve_shares(acts, nums, config, dtype)
    for layer in nums:
        for which in "kv":
            for t, tier in enumerate(config.tiers_for(which)):
                cs = parse_cache_spec(tier)
                if not static_names(cs):
                    continue
                # every token, the first left out (sink=1 only trims it from the fit): its keys are often far
                # outside the others' ranges, and the sink is stored in the highest tier anyway
                act, fisher = torch.stack(acts[f"{layer}.{which}"]), torch.stack(acts[f"{layer}.{which}.fisher"])
                for name, x in fit_statics(replace(cs, sink=1), act, fisher, seed).items():
                    tensors[CalibKey(layer, which, f"t{t}_{name}")] = x.contiguous()
    return tensors, eps
