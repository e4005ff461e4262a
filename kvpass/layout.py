"""Plan: the static buffer layout of every attention layer for a method, with its exact bytes."""

from __future__ import annotations

from dataclasses import dataclass

from kvpass.kvcache import CacheLayout
from kvpass.methods import MethodConfig
from kvpass.passes.locate import AttentionSite


@dataclass(frozen=True)
class KVLayout:
    """Keys and values of one layer."""

    layer: int
    key: CacheLayout
    value: CacheLayout
    sliding_window: int | None = None

    @property
    def nbytes(self) -> int:
        return self.key.nbytes + self.value.nbytes

    @property
    def dense_nbytes(self) -> int:
        return self.key.dense_nbytes + self.value.dense_nbytes


def plan(sites: list[AttentionSite], method: MethodConfig, sliding_window: dict[int, int] | None = None) -> list[KVLayout]:
    """One :class:`KVLayout` per site: the method's specs at the site's shapes."""
    layouts = []
    for site in sites:
        k = CacheLayout.build(method.key_spec(site.head_dim), (site.batch, site.kv_heads, site.max_len, site.head_dim),
                              site.dtype)
        v = CacheLayout.build(method.value_spec(site.v_head_dim),
                              (site.batch, site.kv_heads, site.max_len, site.v_head_dim), site.dtype)
        layouts.append(KVLayout(site.index, k, v, (sliding_window or {}).get(site.index)))
    return layouts
