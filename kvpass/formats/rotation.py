"""Seeded randomized Hadamard rotation of each vector (``:hadamard``): ``R = H · diag(signs)``.

After a random orthogonal rotation the coordinates of any vector follow one known, concentrated distribution (close
to N(0, |x|²/d)), whatever outlier channels the vector had: the premise of TurboQuant's data-oblivious codebooks.
``H`` is a normalized Sylvester Hadamard matrix; a dimension that is not a power of two is split into power-of-two
blocks (64 + 16 for 80), each rotated on its own, so ``R`` stays exactly orthogonal. The signs come from a fixed
seed, so every cache, export and run rotates alike.
"""

from __future__ import annotations

import functools

import torch

SEED = 0x6B7670  # "kvp"


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def blocks(d: int) -> list[int]:
    """The power-of-two block sizes of dimension ``d``, largest first."""
    return [1 << b for b in reversed(range(d.bit_length())) if d >> b & 1]


@functools.cache
def _signs(d: int) -> torch.Tensor:
    return torch.randint(0, 2, (d,), generator=torch.Generator().manual_seed(SEED), dtype=torch.int64) * 2 - 1


@functools.cache
def signs(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The float32 signs of ``R = H · diag(signs)`` (what a fast Hadamard transform multiplies by; shared: read it,
    never write it)."""
    return _signs(d).float().to(device)


@functools.cache
def _matrix(d: int) -> torch.Tensor:
    signs = _signs(d)
    r = torch.zeros(d, d, dtype=torch.float64)
    i = 0
    for n in blocks(d):
        r[i:i + n, i:i + n] = _sylvester(n)
        i += n
    return (r * signs.double()).float()  # R[:, j] scaled by sign j: R = H diag(signs)


def matrix(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthogonal ``[d, d]`` rotation ``R`` (float32); a vector ``x`` (a row) becomes ``x @ R.T``."""
    return _matrix(d).to(device)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """Rotate every vector along the last axis (float32)."""
    return x.float() @ matrix(x.shape[-1], x.device).T


def unrotate(x: torch.Tensor) -> torch.Tensor:
    """Undo :func:`rotate` (float32)."""
    return x.float() @ matrix(x.shape[-1], x.device)
