"""QAQ's handler: tiers of fixed capacity per layer from the calibrated shares, and its one op
(``kv_qaq_attention_``) that writes, attends and codes the tokens leaving the window."""

from __future__ import annotations

import re
from dataclasses import replace

import torch
from torch.fx import Node

from kvpass.calibration.guard import calibration_loss
from kvpass.calibration.store import Calibration
from kvpass.errors import KVPassError
from kvpass.kvcache import parse_cache_spec, static_names
from kvpass.methods.base import MethodConfig
from kvpass.methods.qaq.config import QAQConfig, capacities, fixed_nbytes, qnorm_stats_nbytes
from kvpass.methods.qaq.fit import eps_meta, fit_qaq, numerators, reachable, solve_shares
from kvpass.methods.qaq.op import QAQMeta
from kvpass.methods.qaq.storage import TierLayout
from kvpass.pipeline.buffers import Role
from kvpass.pipeline.handler import FitData, LayerPlan, MethodHandler, RewriteContext, register_handler
from kvpass.pipeline.locate import AttentionSite
from kvpass.pipeline.plan import KVLayout
from kvpass.pipeline.rewrite import get_attrs, positions_node, rope_args, rope_fields

MORE_BITS = 0.5  # bits per element the quality guard adds to QAQ's target a round
TOLERANCE_STEPS = 6  # bisection steps of a tolerance's target search: about a sixth of a bit from 2 to 16 bits


class QAQHandler(MethodHandler):
    """``MethodConfig(qaq=QAQConfig(...))``: the method's ``key`` and ``value`` specs are unused."""

    def needs_calibration(self, method: MethodConfig) -> bool:
        return True

    def nominal_bits(self, method: MethodConfig, head_dim: int, tokens: int) -> float:
        config = method.qaq  # the target is what the calibration solves for (tier map included)
        fixed = sum(fixed_nbytes(config, head_dim, w, torch.float16) for w in "kv")
        per_token = config.target_bits or float("nan")  # (eps and tolerance: the bits follow from the model)
        if config.target_context:
            per_token -= 8.0 * fixed / (2 * config.target_context * head_dim)
        retained = 16.0 if config.retain else 0.0  # the model-precision copy of every token (fp16 here)
        return per_token + retained + 8.0 * fixed / (2 * tokens * head_dim)

    def plan(self, method: MethodConfig, site: AttentionSite, calibration: Calibration | None) -> LayerPlan:
        shape = (site.batch, site.kv_heads, site.max_len)
        tiers = tuple(TierLayout(method.qaq, tuple(capacities(qaq_input(calibration, site.index, w)["tier_share"],
                                                              site.max_len, method.qaq.sink)),
                                 *shape, d, site.dtype, holds_score=w == "k", keys=w == "k")
                      for w, d in (("k", site.head_dim), ("v", site.v_head_dim)))
        extra = sum(t.nbytes for t in tiers) + qnorm_stats_nbytes(site.batch, site.kv_heads)
        return LayerPlan(None, None, extra, tiers)

    def emit(self, ctx: RewriteContext, site: AttentionSite, layout: KVLayout, buffers: None,
             tables: tuple | None) -> Node:
        return qaq_attention_node(ctx, site, layout, tables)

    def describe(self, layout: KVLayout) -> tuple[str, str]:
        return tuple(t.describe() for t in layout.detail)

    def recording(self, method: MethodConfig) -> tuple[bool, bool]:
        # gradients only where a tier has calibrated tensors to fit
        return True, any(static_names(parse_cache_spec(t)) for which in "kv" for t in method.qaq.tiers_for(which))

    def fit(self, calibration: Calibration, method: MethodConfig, data: FitData) -> None:
        seq_len = int(data.samples[0].numel())
        if seq_len <= method.qaq.window:
            raise KVPassError(f"method {method.name!r} decides a token's tier after its window of {method.qaq.window} "
                              f"tokens; calibrate on windows longer than that (seq_len > {method.qaq.window}, got "
                              f"{seq_len})")
        config, dtype = method.qaq, next(data.model.parameters()).dtype
        nums = data.memo["qaq_numerators"] = numerators(data.acts, data.layers, config)
        if config.tolerance is None:
            calibration.tensors, eps = fit_qaq(data.acts, data.layers, config, data.seed, dtype, nums)
            set_eps(calibration, eps)
            return
        # the tiers' calibrated tensors do not depend on the target: fitted once, then the target is searched
        lowest, highest = reachable(data.acts, nums, config, dtype)
        calibration.tensors, eps = fit_qaq(data.acts, data.layers, config.with_target(highest), data.seed, dtype, nums)
        search_tolerance(calibration, method, data, nums, dtype, lowest, highest)

    def more_bits(self, calibration: Calibration, method: MethodConfig, data: FitData) -> str | None:
        """A target ``MORE_BITS`` higher (or, with ``eps`` as the knob, a quarter of the eps), the tier shares solved
        again over the same calibration tokens; None when the tiers cannot average more."""
        config, nums = method.qaq, data.memo["qaq_numerators"]  # (recorded by fit)
        dtype = next(data.model.parameters()).dtype
        if config.eps is not None:
            raised = replace(config, eps=float(calibration.meta["eps"]) / 4)
            step = f"eps {raised.eps:.3g}"  # (an eps knob is one eps for every layer)
        else:
            target = float(calibration.meta.get("target_bits", config.target_bits)) + MORE_BITS
            raised, step = config.with_target(target), f"target {target:.2f} bits/elem"
        try:
            shares, eps = solve_shares(data.acts, nums, raised, dtype)
        except KVPassError:  # past what the tiers can average
            return None
        if all(torch.equal(shares[k], calibration.tensors[k]) for k in shares):
            return None
        calibration.tensors |= shares
        set_eps(calibration, eps, raised.target_bits)
        return step


def set_eps(calibration: Calibration, eps: dict[int, float], target_bits: float | None = None) -> None:
    """Record the layers' eps (and the target they were solved for) in ``calibration.meta``."""
    calibration.meta.pop("layer_eps", None)
    calibration.meta |= eps_meta(eps)
    if target_bits is not None:
        calibration.meta["target_bits"] = target_bits


def search_tolerance(calibration: Calibration, method: MethodConfig, data: FitData, nums: dict, dtype: torch.dtype,
                     lowest: float, highest: float) -> None:
    """The fewest target bits whose calibration-window perplexity stays within ``method.qaq.tolerance`` of the
    model-precision cache: bisection between what the tiers can average, ``TOLERANCE_STEPS`` measurements after
    the top; each try is in ``calibration.meta["tolerance_search"]``. Past the tolerance even at the top, the top
    is kept (and the quality guard says so)."""
    tolerance, tried, states = method.qaq.tolerance, [], {}

    def attempt(target: float) -> float:
        shares, eps = solve_shares(data.acts, nums, method.qaq.with_target(target), dtype)
        calibration.tensors |= shares
        set_eps(calibration, eps, target)
        states[target] = (shares, dict(eps))
        loss = calibration_loss(calibration, method, data)
        tried.append([round(target, 4), loss])
        return loss

    lo, hi = lowest + 0.01, highest - 0.01  # (inside the range the bisection of eps can reach)
    if attempt(hi) <= tolerance:
        for _ in range(TOLERANCE_STEPS):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if attempt(mid) <= tolerance else (mid, hi)
    shares, eps = states[hi]
    calibration.tensors |= shares
    set_eps(calibration, eps, hi)
    calibration.meta["tolerance_search"] = tried


def qaq_input(calibration: Calibration | None, layer: int, which: str) -> dict:
    found = calibration.for_layer(layer, which) if calibration is not None else {}
    if "tier_share" not in found or "eps" not in (calibration.meta if calibration is not None else {}):
        raise KVPassError(f"QAQ needs a calibration with tier shares and eps for layer {layer} ({which}); pass "
                          "calibration=kvpass.calibrate(model, texts, method=...) made for this QAQ method")
    return found


def layer_eps(calibration: Calibration, layer: int) -> float:
    """The layer's eps: its own where the calibration solved one per layer, else the model's."""
    return float(calibration.meta.get("layer_eps", {}).get(str(layer), calibration.meta["eps"]))


def _role(name: str) -> Role:
    """Tier codes are written by entry and logged by the op; model-precision copies at the new tokens' slots; the
    map, window ring and its attention are small and cloned before a step."""
    if re.match(r"t\d+_", name):  # a tier's buffer, "t<tier>_<name>"
        return Role.JOURNALED
    return Role.STATE if name == "retained" else Role.ENTRY


def qaq_attention_node(ctx: RewriteContext, site: AttentionSite, layout: KVLayout,
                       tables: tuple[Node | str, Node | str] | None) -> Node:
    """QAQ's buffers (calibrated tier tensors from the calibration) and its one op: write the new tokens, attend,
    code the tokens that left the window (keys before RoPE with ``tables``)."""
    gm, device = ctx.gm, ctx.device
    g, prefix = gm.graph, f"kvpass_cache_{site.index}_qaq"
    names = {}
    for which, tl in zip("kv", layout.detail):
        fitted = ctx.fitted(site.index, which)
        for name, t in tl.allocate(device).items():
            role, target = _role(name), f"{prefix}_{which}_{name}"
            if name in tl.static_buffers():
                if t.numel():  # (a tier of capacity 0 holds none)
                    if name not in fitted:
                        raise KVPassError(f"layer {site.index}: QAQ tier tensor {which}.{name} is not in the "
                                          "calibration; calibrate with kvpass.calibrate(model, texts, method=...) for "
                                          "this method")
                    t = fitted[name].to(device=device, dtype=t.dtype).reshape(t.shape)
                role, target = Role.FIXED, f"{prefix}_{which}_static_{name}"
            names[f"{which}_{name}"] = ctx.buffers.add(target, t, site.index, role)
    q_stats = ctx.buffers.add(f"{prefix}_q_stats", torch.zeros(site.batch, site.kv_heads, 3, device=device), site.index,
                              Role.ENTRY)
    k_bufs = [names[n] for n in names if n.startswith("k_t")]
    v_bufs = [names[n] for n in names if n.startswith("v_t")]
    state = [names["k_map"], names["v_map"], names["k_ring"], names["v_ring"], names["k_ring_score"], q_stats]
    if "k_retained" in names:
        state += [names["k_retained"], names["v_retained"]]
    kt, vt = layout.detail
    meta = QAQMeta(";".join(vt.config.tiers_for("v")), ";".join(kt.config.tiers_for("k")), tuple(kt.capacity),
                   tuple(vt.capacity), layer_eps(ctx.calibration, site.index), kt.config.window,
                   kt.config.quantile, kt.config.sink, site.max_len, float(site.scale), *rope_fields(site, tables))
    positions_node(gm, site.key)
    q_positions = site.key.positions if site.is_causal and site.mask is None else None
    return g.call_function(
        torch.ops.kvpass.kv_qaq_attention_.default,
        (site.query, site.key.new, site.value.new, site.key.positions, get_attrs(gm, k_bufs), get_attrs(gm, v_bufs),
         get_attrs(gm, state), site.mask, q_positions, *rope_args(gm, site, tables), str(meta)),
    )


register_handler(QAQConfig, QAQHandler())
