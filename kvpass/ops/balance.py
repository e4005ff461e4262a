"""``kvpass::kv_balance_``: MiKV's query/key channel balancer, which any method may set on."""

from __future__ import annotations

import torch


@torch.library.custom_op("kvpass::kv_balance_", mutates_args=("scale",))
def kv_balance_(scale: torch.Tensor, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> None:
    """MiKV's query/key channel balancer: on the first chunk of a sequence (position 0), set
    ``scale[b, h, 0, c] = sqrt(max|K_c| / max|Q_c|)`` over the chunk (queries of the head's GQA group). Keys are
    stored divided by it and queries multiplied by it, so ``q . k`` is unchanged while the keys' outlier channels
    shrink before quantization."""
    if int(positions[0]) != 0:
        return
    b, hkv = k.shape[:2]
    kmax = k.abs().amax(dim=2, keepdim=True).float()  # [B, Hkv, 1, D]
    qmax = q.abs().reshape(b, hkv, -1, q.shape[-1]).amax(dim=2, keepdim=True).float()
    ratio = torch.where((kmax > 0) & (qmax > 0), kmax / qmax.clamp_min(1e-12), torch.ones_like(kmax))
    scale.copy_(ratio.sqrt().clamp(1e-2, 1e2).to(scale.dtype))


@kv_balance_.register_fake
def _(scale, q, k, positions) -> None:
    return None


def balance_nbytes(batch: int, heads: int, head_dim: int) -> int:
    """The balancer's fp32 scale per sequence, head and channel."""
    return batch * heads * head_dim * 4
