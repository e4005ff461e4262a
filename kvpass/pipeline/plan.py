"""Plan: the static buffer layout of every attention layer for a method, with its exact bytes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpass.errors import KVPassError
from kvpass.kvcache import CacheLayout
from kvpass.methods.base import MethodConfig
from kvpass.methods.overlay.config import balance_nbytes, overlay_nbytes
from kvpass.methods.qaq.config import capacities, qnorm_stats_nbytes
from kvpass.methods.qaq.storage import TierLayout
from kvpass.pipeline.locate import AttentionSite


@dataclass(frozen=True)
class KVLayout:
    """Keys and values of one layer: low-precision caches (None when a method keeps only its overlay) and the
    bytes of its high-precision overlay, next to the bytes of the full-precision cache it replaces."""

    layer: int
    key: CacheLayout | None
    value: CacheLayout | None
    dense_nbytes: int
    elements: int
    sliding_window: int | None = None
    overlay_nbytes: int = 0
    balance_nbytes: int = 0
    tiers: tuple[TierLayout, TierLayout] | None = None  # QAQ's keys and values

    @property
    def nbytes(self) -> int:
        low = 0 if self.key is None else self.key.nbytes + self.value.nbytes
        if self.tiers is not None:
            low += sum(t.nbytes for t in self.tiers) + qnorm_stats_nbytes(self.tiers[0].batch, self.tiers[0].heads)
        return low + self.overlay_nbytes + self.balance_nbytes


def plan(sites: list[AttentionSite], method: MethodConfig, sliding_window: dict[int, int] | None = None,
         calibration: dict | None = None) -> list[KVLayout]:
    """One :class:`KVLayout` per site: the method's specs at the site's shapes (QAQ's tier capacities from the
    ``calibration`` shares, as :meth:`kvpass.Calibration.as_rewrite_input` gives them)."""
    for field_name in ("full_precision_layers", "promoted_layers"):
        missing = sorted(set(getattr(method, field_name)) - {site.index for site in sites})
        if missing:
            raise KVPassError(f"method {method.name!r} names layers {missing} in {field_name}, but the model's "
                              f"attention layers are 0-{len(sites) - 1}; name existing layers")
    layouts = []
    for site in sites:
        shape = (site.batch, site.kv_heads, site.max_len)
        k = v = None
        if method.keeps_low_precision:
            k = CacheLayout.build(method.key_spec(site.head_dim, site.index), (*shape, site.head_dim), site.dtype)
            v = CacheLayout.build(method.value_spec(site.v_head_dim, site.index), (*shape, site.v_head_dim),
                                  site.dtype)
        elements = site.batch * site.kv_heads * site.max_len * (site.head_dim + site.v_head_dim)
        dense = elements * torch.tensor([], dtype=site.dtype).element_size()
        ov = 0 if method.overlay is None else overlay_nbytes(method.overlay, *shape, site.head_dim, site.v_head_dim,
                                                               site.dtype)
        bal = balance_nbytes(site.batch, site.kv_heads, site.head_dim) if method.balance else 0
        tiers = None
        if method.qaq is not None:
            tiers = tuple(TierLayout(method.qaq, tuple(capacities(qaq_input(calibration, site.index, w)["tier_share"],
                                                                  site.max_len, method.qaq.sink)),
                                     *shape, d, site.dtype, holds_score=w == "k", keys=w == "k")
                          for w, d in (("k", site.head_dim), ("v", site.v_head_dim)))
        layouts.append(KVLayout(site.index, k, v, dense, elements, (sliding_window or {}).get(site.index), ov, bal,
                                tiers))
    return layouts


def qaq_input(calibration: dict | None, layer: int, which: str) -> dict:
    found = (calibration or {}).get((layer, which), {})
    if "tier_share" not in found or "eps" not in found:
        raise KVPassError(f"QAQ needs a calibration with tier shares and eps for layer {layer} ({which}); pass "
                          "calibration=kvpass.calibrate(model, texts, method=...) made for this QAQ method")
    return found
