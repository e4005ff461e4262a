"""QAQ's bit formulas: the bits a key or value token needs for its attention, and the tiers they round to."""

from __future__ import annotations

import math
from statistics import NormalDist

import torch


def quantile_norm(stats: torch.Tensor, quantile: float) -> torch.Tensor:
    """The ``quantile`` of a log-normal fitted to query norms from ``stats[..., (count, sum, sum of squares)]``
    of ``log |q|``."""
    n = stats[..., 0].clamp_min(1)
    mean = stats[..., 1] / n
    var = (stats[..., 2] / n - mean**2).clamp_min(0)
    return torch.exp(mean + NormalDist().inv_cdf(quantile) * var.sqrt())


def value_numerator(alpha: torch.Tensor, value_range: torch.Tensor) -> torch.Tensor:
    """``a`` of ``B_v = ceil(log2(1 + a / eps))``."""
    return alpha * value_range


def key_numerator(alpha: torch.Tensor, key_range: torch.Tensor, q_norm: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``a`` of ``B_k = ceil(log2(1 + a / eps))``."""
    a = alpha.clamp(0, 0.5)  # the monotone envelope of a (1 - a): see the module docstring
    return a * (1 - a) * q_norm * key_range / math.sqrt(head_dim)


def bits_for(numerator: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ceil(torch.log2(1 + numerator / eps))


def value_bits(alpha: torch.Tensor, value_range: torch.Tensor, eps: float) -> torch.Tensor:
    return bits_for(value_numerator(alpha, value_range), eps)


def key_bits(alpha: torch.Tensor, key_range: torch.Tensor, q_norm: torch.Tensor, head_dim: int, eps: float) -> torch.Tensor:
    return bits_for(key_numerator(alpha, key_range, q_norm, head_dim), eps)


def to_tier(bits: torch.Tensor, tiers: tuple[int, ...]) -> torch.Tensor:
    """Index of the smallest tier with at least ``bits`` (the largest tier when none has)."""
    edges = torch.tensor(tiers, dtype=bits.dtype, device=bits.device)
    return torch.bucketize(bits, edges).clamp_max(len(tiers) - 1)


def token_range(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x.amax(-1) - x.amin(-1)
