"""A plain PyTorch decoder (not transformers) holding its own static KV cache buffers, gpt-fast style:
written by index assignment (or, ExecuTorch style, by copy_ into a token slice), read by SDPA, with
interleaved (GPT-J style) rotary embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, batch: int, max_len: int, write: str = "index") -> None:
        super().__init__()
        self.write = write
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.register_buffer("k_cache", torch.zeros(batch, kv_heads, max_len, self.head_dim))
        self.register_buffer("v_cache", torch.zeros(batch, kv_heads, max_len, self.head_dim))

    def forward(self, x, positions, cos, sin, mask):
        b, t, _ = x.shape
        h = self.norm(x)
        q = self.wq(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_interleaved(q) * sin
        k = k * cos + rotate_interleaved(k) * sin
        if self.write == "index":
            self.k_cache[:, :, positions] = k
            self.v_cache[:, :, positions] = v
        else:
            start = positions[0].item()
            torch._check(start >= 0)
            torch._check(start + t <= self.k_cache.shape[2])
            self.k_cache[:, :, start:start + t].copy_(k)
            self.v_cache[:, :, start:start + t].copy_(v)
        att = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        x = x + self.wo(att.transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(x)


class PlainDecoder(nn.Module):
    def __init__(self, vocab=80, dim=64, heads=4, kv_heads=2, layers=2, batch=1, max_len=48, write="index") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, batch, max_len, write) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        hd = dim // heads
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)), persistent=False)
        self.max_len = max_len

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None].float() * self.inv_freq[None, :]
        cos = angles.cos().repeat_interleave(2, dim=-1)
        sin = angles.sin().repeat_interleave(2, dim=-1)
        mask = torch.arange(self.max_len, device=tokens.device)[None, :] <= positions[:, None]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, positions, cos, sin, mask)
        return self.head(x)
