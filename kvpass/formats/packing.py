"""Bit packing of integer codes into uint8 along the last axis.

Codes of ``b`` bits are packed in units of ``u = 8 / gcd(b, 8)`` codes that fill exactly ``b*u/8`` bytes:
four 2-bit codes per byte, two 4-bit codes per byte, eight 3-bit codes in three bytes, one 8-bit code
per byte. Inside a unit the first code takes the least significant bits (little-endian), and the
unit's bytes are stored least significant first; the ONNX and TensorRT lowerings rely on that order.
A last, partial unit is zero-padded, so ``n`` codes take ``ceil(n / u) * b*u/8`` bytes.

Only plain tensor ops are used (shift, and, sum), so packing traces under torch.export and compiles. Inside
:func:`arithmetic` the same bytes come from integer multiply, divide and modulo instead: what an ONNX export
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
def arithmetic() -> Iterator[None]:
    """Pack and unpack by integer arithmetic (no shift or bitwise op) inside the block: same bytes."""
    token = _ARITHMETIC.set(True)
    try:
        yield
    finally:
        _ARITHMETIC.reset(token)


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
        return packed[..., :n]
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


def _bit_tables(bits: int, per_unit: int, unit_bytes: int, device) -> tuple[torch.Tensor, ...]:
    """For code i of a unit and byte j: the divisor, modulus and multiplier that move the bits they share.

    Every value stays below 256, so the ONNX exporter's float division of integers is exact too.
    """
    div, mod, mul = (torch.ones(per_unit, unit_bytes, dtype=torch.int32) for _ in range(3))
    mul.zero_()
    for i in range(per_unit):
        for j in range(unit_bytes):
            lo, hi = max(i * bits, 8 * j), min(i * bits + bits, 8 * j + 8)  # the shared bits
            if lo < hi:
                div[i, j], mod[i, j], mul[i, j] = 1 << (lo - i * bits), 1 << (hi - lo), 1 << (lo - 8 * j)
    return div.to(device), mod.to(device), mul.to(device)


def _pack_arithmetic(codes: torch.Tensor, bits: int, per_unit: int, unit_bytes: int) -> torch.Tensor:
    c = codes.to(torch.int32)
    pad = (-c.shape[-1]) % per_unit
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, per_unit, 1)
    div, mod, mul = _bit_tables(bits, per_unit, unit_bytes, c.device)
    out = (torch.remainder(torch.div(c, div, rounding_mode="floor"), mod) * mul).sum(-2, dtype=torch.int32)
    return out.reshape(*out.shape[:-2], -1).to(torch.uint8)


def _unpack_arithmetic(packed: torch.Tensor, bits: int, n: int, per_unit: int, unit_bytes: int) -> torch.Tensor:
    p = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, 1, unit_bytes)
    div, mod, mul = _bit_tables(bits, per_unit, unit_bytes, p.device)
    # byte j's bits of code i sit at bit (lo - 8j) of the byte and (lo - i*bits) of the code: swap the roles
    shift_in_byte, shift_in_code = mul, div
    codes = (torch.remainder(torch.div(p, torch.where(mod > 1, shift_in_byte, 1), rounding_mode="floor"), mod)
             * torch.where(mul > 0, shift_in_code, 0)).sum(-1, dtype=torch.int32)
    return codes.reshape(*codes.shape[:-2], -1)[..., :n].to(torch.uint8)
