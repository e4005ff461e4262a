"""``cache_report()``: bytes of every cache buffer, bits per element and the full-precision bytes replaced."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from kvpass.pipeline.buffers import BufferRecord
from kvpass.pipeline.handler import handler_for
from kvpass.pipeline.plan import KVLayout

if TYPE_CHECKING:
    import torch

    from kvpass.methods.base import MethodConfig


@dataclass(frozen=True)
class LayerReport:
    layer: int
    key_spec: str
    value_spec: str
    buffers: dict[str, int]  # buffer name -> bytes
    nbytes: int
    dense_nbytes: int
    elements: int
    sliding_window: int | None

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / self.elements


@dataclass(frozen=True)
class CacheReport:
    """Measured from the real buffers of the rewritten module, metadata included."""

    method: str
    layers: list[LayerReport]
    dense_dtype: str
    shared: dict[str, int] = None  # buffers used by every layer (positions or cos/sin of keys stored before RoPE)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers) + sum((self.shared or {}).values())

    @property
    def dense_nbytes(self) -> int:
        return sum(layer.dense_nbytes for layer in self.layers)

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / sum(layer.elements for layer in self.layers)

    @property
    def compression(self) -> float:
        return self.dense_nbytes / self.nbytes

    def as_dict(self) -> dict:
        return {
            "method": self.method, "cache_bytes": self.nbytes, "dense_bytes": self.dense_nbytes,
            "shared_buffers": dict(self.shared or {}),
            "dense_dtype": self.dense_dtype, "bits_per_element": self.bits_per_element,
            "layers": [{**layer.__dict__, "bits_per_element": layer.bits_per_element} for layer in self.layers],
        }

    def table(self) -> Table:
        """Per-layer rows, consecutive identical layers merged into one row (``0-29``)."""
        t = Table(title=f"kvpass cache: {self.method}")
        for col in ("layers", "keys", "values", "bytes", f"{self.dense_dtype} bytes", "bits/elem", "note"):
            t.add_column(col, justify="left" if col in ("layers", "keys", "values", "note") else "right", no_wrap=True)
        groups: list[list[LayerReport]] = []
        for layer in self.layers:
            same = groups and _row_key(groups[-1][-1]) == _row_key(layer)
            (groups[-1].append(layer) if same else groups.append([layer]))
        for g in groups:
            first, n = g[0], len(g)
            name = str(first.layer) if n == 1 else f"{first.layer}-{g[-1].layer}"
            note = f"sliding window {first.sliding_window}, stored full length" if first.sliding_window else ""
            each = " each" if n > 1 else ""
            t.add_row(name, first.key_spec, first.value_spec, f"{first.nbytes:,}{each}", f"{first.dense_nbytes:,}{each}",
                      f"{first.bits_per_element:.3f}", note)
        if self.shared:
            t.add_row("shared", "RoPE positions (or cos/sin) of cached keys", "", f"{sum(self.shared.values()):,}", "", "", "")
        t.add_row("total", "", "", f"{self.nbytes:,}", f"{self.dense_nbytes:,}", f"{self.bits_per_element:.3f}",
                  f"{self.compression:.2f}x smaller")
        return t

    def __str__(self) -> str:
        console = Console(width=160)
        with console.capture() as cap:
            console.print(self.table())
        return cap.get()


def _row_key(layer: LayerReport) -> tuple:
    return layer.key_spec, layer.value_spec, layer.nbytes, layer.dense_nbytes, layer.sliding_window


def build_report(method: MethodConfig, layouts: list[KVLayout], buffers: dict[str, torch.Tensor],
                 records: list[BufferRecord], dense_dtype: str) -> CacheReport:
    """Bytes per layer from the real buffers the rewrite recorded for it (``records``), described by the method's
    handler; buffers of no one layer (RoPE tables) are counted as shared."""
    handler = handler_for(method)
    size = {r.name: buffers[r.name].numel() * buffers[r.name].element_size() for r in records}
    layers = []
    for layout in layouts:
        mine = {r.name: size[r.name] for r in records if r.layer == layout.layer}
        kspec, vspec = handler.describe(layout)
        layers.append(LayerReport(layout.layer, kspec, vspec, mine, sum(mine.values()), layout.dense_nbytes,
                                  layout.elements, layout.sliding_window))
    shared = {r.name: size[r.name] for r in records if r.layer is None}
    return CacheReport(method.name, layers, dense_dtype, shared)
