"""Bit packing of integer codes into uint8 along the last axis.

Codes of ``b`` bits are packed in units of ``u = 8 / gcd(b, 8)`` codes that fill exactly ``b*u/8`` bytes:
four 2-bit codes per byte, two 4-bit codes per byte, eight 3-bit codes in three bytes, one 8-bit code
per byte. Inside a unit the first code takes the least significant bits (little-endian), and the
unit's bytes are stored least significant first; the ONNX and TensorRT lowerings rely on that order.
A last, partial unit is zero-padded, so ``n`` codes take ``ceil(n / u) * b*u/8`` bytes.

Only plain tensor ops are used (shift, and, sum), so packing traces under torch.export and compiles. Inside
:func:`arithmetic` the same bytes come from exact float32 arithmetic on powers of two instead: what an ONNX export
traces, since ONNX's bit shifts take no int8 and TensorRT's parser takes no shift or bitwise op at all.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch

_ARITHMETIC = contextvars.ContextVar("kvpass_packing_arithmetic", default=False)


@contextlib.contextmanager
def switched_on(flag: contextvars.ContextVar) -> Iterator[None]:
    """Set a boolean context variable inside the block (the export's switches)."""
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


def arithmetic() -> contextlib.AbstractContextManager[None]:
    """Pack and unpack by float arithmetic (no shift, bitwise or integer op) inside the block: same bytes."""
    return switched_on(_ARITHMETIC)


def unit(bits: int) -> tuple[int, int]:
    """(codes per unit, bytes per unit) for ``bits``-bit codes."""
    codes = 8 // math.gcd(bits, 8)
    return codes, bits * codes // 8


def packed_len(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take once packed."""
    codes, nbytes = unit(bits)
    return -(-n // codes) * nbytes


def arithmetic_enabled() -> bool:
    """Whether the caller is inside :func:`arithmetic` (formats with other bit tricks follow it too: fp8)."""
    return _ARITHMETIC.get()


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last axis into uint8."""
    if bits == 8:
        return codes.to(torch.uint8)
    per_unit, unit_bytes = unit(bits)
    if _ARITHMETIC.get():
        return _pack_arithmetic(codes, bits, per_unit, unit_bytes)
    if unit_bytes == 1:
        return _pack_in_bytes(codes, bits, per_unit)
    n = codes.shape[-1]
    pad = (-n) % per_unit
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, per_unit)
    shifts = torch.arange(per_unit, device=c.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1, keepdim=True)
    byte_shifts = torch.arange(unit_bytes, device=c.device, dtype=torch.int64) * 8
    out = (word >> byte_shifts) & 0xFF
    return out.reshape(*out.shape[:-2], -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes along the last axis, as uint8."""
    if bits == 8:
        return packed.float()[..., :n].to(torch.uint8) if _ARITHMETIC.get() else packed[..., :n]
    per_unit, unit_bytes = unit(bits)
    if _ARITHMETIC.get():
        return _unpack_arithmetic(packed, bits, n, per_unit, unit_bytes)
    if unit_bytes == 1:
        # one scalar shift per code slot: a broadcast shift by a tensor of shifts runs several times slower on CPU
        mask = (1 << bits) - 1
        codes = torch.stack([(packed >> s) & mask for s in range(0, 8, bits)], dim=-1)
        return codes.reshape(*packed.shape[:-1], -1)[..., :n]
    p = packed.to(torch.int64).reshape(*packed.shape[:-1], -1, unit_bytes)
    byte_shifts = torch.arange(unit_bytes, device=p.device, dtype=torch.int64) * 8
    word = (p << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(per_unit, device=p.device, dtype=torch.int64) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*codes.shape[:-2], -1)[..., :n].to(torch.uint8)


def _pack_in_bytes(codes: torch.Tensor, bits: int, per_unit: int) -> torch.Tensor:
    """1, 2 and 4 bits: a unit is one byte, so the work stays in uint8 (the general path widens to int64, which
    made unpacking the largest cost of a CPU decode step)."""
    c = codes.to(torch.uint8)
    pad = (-c.shape[-1]) % per_unit
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, per_unit)
    out = c[..., 0].clone()
    for i in range(1, per_unit):
        out |= c[..., i] << (i * bits)
    return out


def _bit_tables(bits: int, per_unit: int, unit_bytes: int, into_bytes: bool, device) -> tuple[torch.Tensor, ...]:
    """For code i of a unit and byte j, the bits they share as float32 factors: ``floor(x * lo) - floor(x * hi) * width``
    takes them out of the source (a code when packing, a byte when unpacking) and ``* place`` puts them in the target.

    Every value stays below 256 and every factor is a power of two, so float32 arithmetic is exact: ONNX Runtime and
    TensorRT run it as it is, with no shift, bitwise or integer op.
    """
    lo, hi, width, place = ([[1.0] * unit_bytes for _ in range(per_unit)] for _ in range(4))
    for i in range(per_unit):
        for j in range(unit_bytes):
            first, last = max(i * bits, 8 * j), min(i * bits + bits, 8 * j + 8)  # the shared bits
            if first >= last:
                place[i][j] = 0.0
                continue
            src, dst = (i * bits, 8 * j) if into_bytes else (8 * j, i * bits)
            lo[i][j], hi[i][j] = 2.0 ** (src - first), 2.0 ** (src - last)
            width[i][j], place[i][j] = 2.0 ** (last - first), 2.0 ** (first - dst)
    return tuple(torch.tensor(t, dtype=torch.float32, device=device) for t in (lo, hi, width, place))


def _move_bits(x: torch.Tensor, tables: tuple[torch.Tensor, ...], axis: int) -> torch.Tensor:
    lo, hi, width, place = tables
    return ((torch.floor(x * lo) - torch.floor(x * hi) * width) * place).sum(axis)


def _pack_arithmetic(codes: torch.Tensor, bits: int, per_unit: int, unit_bytes: int) -> torch.Tensor:
    c = codes.to(torch.float32)
    pad = (-c.shape[-1]) % per_unit
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, per_unit, 1)
    out = _move_bits(c, _bit_tables(bits, per_unit, unit_bytes, True, c.device), -2)
    return out.reshape(*out.shape[:-2], -1).to(torch.uint8)


def _unpack_arithmetic(packed: torch.Tensor, bits: int, n: int, per_unit: int, unit_bytes: int) -> torch.Tensor:
    p = packed.to(torch.float32).reshape(*packed.shape[:-1], -1, 1, unit_bytes)
    codes = _move_bits(p, _bit_tables(bits, per_unit, unit_bytes, False, p.device), -1)
    return codes.reshape(*codes.shape[:-2], -1)[..., :n].to(torch.uint8)
