"""The importance overlay's configuration and its bytes (MiKV, H2O, StreamingLLM)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OverlayConfig:
    """A fixed share of tokens per KV head held at high precision, chosen by accumulated attention (``by_score``)
    or by age, never evicting the first ``sink`` or the ``recent`` newest tokens. With ``evict`` the other tokens
    are dropped (H2O, StreamingLLM) instead of kept in low precision (MiKV)."""

    budget: float
    recent: int | None = None  # None: half of the overlay, as H2O splits its budget between heavy and recent
    sink: int = 0
    high: str = "fp16"  # "fp16", or "none" for the model's dtype
    evict: bool = False
    by_score: bool = True

    def capacity(self, max_len: int) -> int:
        return max(1, min(max_len, math.ceil(self.budget * max_len - 1e-9)))

    def recent_tokens(self, max_len: int) -> int:
        return self.capacity(max_len) // 2 if self.recent is None else self.recent

    def dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.high == "none" else torch.float16



def overlay_nbytes(ov: OverlayConfig, batch: int, heads: int, max_len: int, dk: int, dv: int,
                   model_dtype: torch.dtype) -> int:
    """Overlay K and V rows, the int32 slot of each entry, and the fp32 score of every token."""
    c = ov.capacity(max_len)
    row = torch.tensor([], dtype=ov.dtype(model_dtype)).element_size()
    return batch * heads * (c * (dk + dv) * row + c * 4 + max_len * 4)
