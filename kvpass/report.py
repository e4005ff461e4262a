"""``cache_report()``: bytes of every cache buffer, bits per element and the full-precision bytes replaced."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from kvpass.layout import KVLayout


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

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

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
            "dense_dtype": self.dense_dtype, "bits_per_element": self.bits_per_element,
            "layers": [{**layer.__dict__, "bits_per_element": layer.bits_per_element} for layer in self.layers],
        }

    def table(self) -> Table:
        t = Table(title=f"kvpass cache: {self.method}")
        for col in ("layer", "keys", "values", "bytes", f"{self.dense_dtype} bytes", "bits/elem", "note"):
            t.add_column(col, justify="right" if col not in ("keys", "values", "note") else "left")
        for layer in self.layers:
            note = f"sliding window {layer.sliding_window}, stored full length" if layer.sliding_window else ""
            t.add_row(str(layer.layer), layer.key_spec, layer.value_spec, f"{layer.nbytes:,}", f"{layer.dense_nbytes:,}",
                      f"{layer.bits_per_element:.3f}", note)
        t.add_row("total", "", "", f"{self.nbytes:,}", f"{self.dense_nbytes:,}", f"{self.bits_per_element:.3f}",
                  f"{self.compression:.2f}x smaller")
        return t

    def __str__(self) -> str:
        console = Console(width=140, record=True, file=None)
        with console.capture() as cap:
            console.print(self.table())
        return cap.get()


def build_report(method: str, layouts: list[KVLayout], buffers: dict[str, "object"], dense_dtype: str) -> CacheReport:
    """Bytes per layer from the real buffers named ``kvpass_cache_{layer}_...``."""
    layers = []
    for layout in layouts:
        prefix = f"kvpass_cache_{layout.layer}_"
        mine = {n: t.numel() * t.element_size() for n, t in buffers.items() if n.startswith(prefix)}
        k, v = layout.key, layout.value
        elements = k.batch * k.heads * k.max_len * (k.head_dim + v.head_dim)
        layers.append(LayerReport(layout.layer, str(k.spec), str(v.spec), mine, sum(mine.values()),
                                  layout.dense_nbytes, elements, layout.sliding_window))
    return CacheReport(method, layers, dense_dtype)
