"""The buffers a rewrite adds to the module, one typed record each: which layer holds it and whether it is
per-sequence state (zeroed when a new sequence starts, and put back as it was when a step fails part-way) or fixed
(calibrated or constant, kept across sequences)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch.fx import GraphModule


class Role(enum.Enum):
    STATE = "state"  # written at the slots of the tokens that arrive: codes, scales, zero points
    RING = "ring"  # small state rewritten in place, not by slot (a residual ring and its count, a recent ring)
    ENTRY = "entry"  # small state a method rewrites wherever it chooses (overlay scores, QAQ's tier map): cloned too
    JOURNALED = "journaled"  # large state rewritten by entry (overlay rows, QAQ tier codes): its op logs old rows
    FIXED = "fixed"  # calibrated or constant: LUTs, ranges, tier tensors

    @property
    def per_sequence(self) -> bool:
        """Emptied when a new sequence starts."""
        return self is not Role.FIXED


@dataclass(frozen=True)
class BufferRecord:
    name: str
    layer: int | None  # None: shared by layers (a RoPE table)
    role: Role


class BufferTable:
    """Registers buffers on the module being rewritten and keeps their records."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.records: list[BufferRecord] = []

    def add(self, name: str, tensor: torch.Tensor, layer: int | None, role: Role = Role.STATE) -> str:
        self.gm.register_buffer(name, tensor)
        self.records.append(BufferRecord(name, layer, role))
        return name
