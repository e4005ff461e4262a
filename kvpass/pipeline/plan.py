"""Plan: the static buffer layout of every attention layer for a method, with its exact bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvpass.errors import KVPassError
from kvpass.kvcache import CacheLayout
from kvpass.ops.balance import balance_nbytes
from kvpass.pipeline.handler import handler_for
from kvpass.pipeline.locate import AttentionSite

if TYPE_CHECKING:
    from kvpass.calibration.store import Calibration
    from kvpass.methods.base import MethodConfig


@dataclass(frozen=True)
class KVLayout:
    """Keys and values of one layer: its key and value caches (None when its method keeps none), the bytes of
    whatever else the method holds for it (overlay, balancer, tiers) and the method's own record of the layer
    (``detail``: QAQ's tier layouts), next to the bytes of the full-precision cache it replaces."""

    layer: int
    key: CacheLayout | None
    value: CacheLayout | None
    dense_nbytes: int
    elements: int
    sliding_window: int | None = None
    extra_nbytes: int = 0
    detail: Any = None

    @property
    def nbytes(self) -> int:
        low = 0 if self.key is None else self.key.nbytes + self.value.nbytes
        return low + self.extra_nbytes


def plan(sites: list[AttentionSite], method: MethodConfig, sliding_window: dict[int, int] | None = None,
         calibration: Calibration | None = None) -> list[KVLayout]:
    """One :class:`KVLayout` per site from the method's handler, at the site's shapes, reading what the
    calibration fitted or chose (tier shares, sensitive layers)."""
    for field_name in ("full_precision_layers", "promoted_layers"):
        missing = sorted(set(getattr(method, field_name)) - {site.index for site in sites})
        if missing:
            raise KVPassError(f"method {method.name!r} names layers {missing} in {field_name}, but the model's "
                              f"attention layers are 0-{len(sites) - 1}; name existing layers")
    handler = handler_for(method)
    layouts = []
    for site in sites:
        lp = handler.plan(method, site, calibration)
        elements = site.batch * site.kv_heads * site.max_len * (site.head_dim + site.v_head_dim)
        dense = elements * torch.tensor([], dtype=site.dtype).element_size()
        balance = balance_nbytes(site.batch, site.kv_heads, site.head_dim) if method.balance else 0
        layouts.append(KVLayout(site.index, lp.key, lp.value, dense, elements, (sliding_window or {}).get(site.index),
                                lp.extra_nbytes + balance, lp.detail))
    return layouts
