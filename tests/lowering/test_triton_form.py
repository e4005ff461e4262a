"""The decode-form Triton kernel (every spec the methods use) against the reference kernels, on the GPU when there
is one and otherwise through Triton's CPU interpreter (``TRITON_INTERPRET=1``): fp32 on the CPU (within 2e-5 of the
reference), fp16 queries on the GPU (within 2e-3: fp16 dots with fp32 accumulation)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined, so before the import
pytest.importorskip("triton", reason="triton is not installed (pip install 'kvpass[triton]')")

from helpers.caches import filled, make_mask, rope_tables
from kvpass.lowering import triton as tl_lowering

from kvpass.ops.cache import reference_kv_attention
from kvpass.ops.meta import AttentionMeta
from kvpass.ops.recent import kv_recent_attention_, recent_attention, reference_reads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
TOL = 2e-3 if DEVICE == "cuda" else 2e-5

# (key spec, value spec, RoPE of keys stored before it): every layout the methods' presets store, and the odd ones
CASES = [
    ("nuq4:per_channel:static:channel_lut+outliers3%|sink=1", "nuq4:per_token+outliers3%|sink=1", "half"),
    ("nuq2:per_channel:static:channel_lut:qnorm", "nuq2:per_token:qnorm", "half"),
    ("nuq3:per_channel:static:channel_lut|sink=1", "nuq3:per_token|sink=1", ""),
    ("int2:per_channel:g16|residual=16", "int2:per_token:g16|residual=16", ""),
    ("int4:per_channel:g8+outliers5%|residual=16", "int4:per_token:g16|residual=16|sink=2", "interleaved"),
    ("lm4:per_token:hadamard", "lm4:per_token:hadamard", ""),
    ("lm3:per_token:g16:hadamard+outliers5%", "lm4:per_token:hadamard", ""),
    ("fp8_e4m3:per_token", "fp8_e5m2:per_head", ""),
    ("int3:per_token", "int4:per_channel:static", "half"),
    ("int4:per_token:g16", "fp16", ""),
    ("lm4:per_token:hadamard+outliers3%|centre=8", "lm4:per_token:hadamard|centre=8", ""),
    ("nuq4:per_channel:static:channel_lut|sink=1|centre=8", "int4:per_token:g16|centre=8", "half"),
]


@pytest.mark.parametrize("k_spec,v_spec,rope", CASES)
@pytest.mark.parametrize("shape", [(2, 2, 3, 1, 48, "bool"), (1, 1, 4, 3, 80, "causal")])
def test_form_kernel_equals_the_reference(k_spec, v_spec, rope, shape):
    b, hkv, groups, t, s, mask_kind = shape
    gen = torch.Generator().manual_seed(hash((k_spec, v_spec, s)) % 2**16)
    check_against_the_reference(k_spec, v_spec, rope, b, hkv, groups, t, 32, s, s - 7, mask_kind, b, gen)


def check_against_the_reference(k_spec, v_spec, rope, b, hkv, groups, t, d, s, n, mask_kind, rope_batch, gen):
    """Random caches of the specs holding n tokens, the decode-form kernel's attention against the reference's."""
    kc, ks = filled(k_spec, b, hkv, s, d, n, gen)
    vc, vs = filled(v_spec, b, hkv, s, d, n, gen)
    q = torch.randn(b, hkv * groups, t, d, generator=gen)
    cos, sin = rope_tables(rope_batch, s, 16, gen) if rope else (None, None)
    mask, q_positions = make_mask(mask_kind, b, t, s, n, gen)
    meta = AttentionMeta(k_spec, v_spec, d, d, s, d**-0.5, rope=rope, rotary_dim=16 if rope else 0)
    assert tl_lowering.form_attention_applies(q, meta)
    ref, _ = reference_kv_attention(q, kc, ks, vc, vs, mask, q_positions, cos, sin, meta)
    dev = [[x.to(DEVICE) for x in group] for group in (kc, ks, vc, vs)]
    moved = [None if x is None else x.to(DEVICE) for x in (mask, q_positions, cos, sin)]
    out = tl_lowering.form_attention(q.to(DEVICE, DTYPE), *dev[:2], *dev[2:], *moved, meta)
    torch.testing.assert_close(out.float().cpu(), ref, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("k_spec,v_spec", [
    ("nuq2:per_channel:static:channel_lut:qnorm+outliers3%|sink=1|recent=8", "nuq2:per_token:qnorm+outliers3%|sink=1|recent=8"),
    ("int4:per_token:g16|recent=8", "int2:per_token:g16|recent=8"),
])
def test_recent_window_decode_equals_the_reference(k_spec, v_spec):
    # the window op's one-token decode: the new token stored, then the ring's tokens read exact and the rest coded
    gen = torch.Generator().manual_seed(3)
    b, hkv, groups, s, d, n = 2, 2, 2, 40, 32, 29
    kc, ks = filled(k_spec, b, hkv, s, d, n, gen)
    vc, vs = filled(v_spec, b, hkv, s, d, n, gen)
    q = torch.randn(b, hkv * groups, 1, d, generator=gen)
    new_k, new_v = (torch.randn(b, hkv, 1, d, generator=gen) for _ in range(2))
    positions = torch.tensor([n])
    cos, sin = rope_tables(b, s, d, gen)
    meta = AttentionMeta(k_spec, v_spec, d, d, s, d**-0.5, rope="half", rotary_dim=d)
    ref_caches = [[x.clone() for x in group] for group in (kc, vc)]
    ref = recent_attention(q, new_k, new_v, positions, ref_caches[0], ks, ref_caches[1], vs, None, positions, cos,
                           sin, meta, reference_reads)
    out = tl_lowering.recent_decode(q.to(DTYPE), new_k.to(DTYPE), new_v.to(DTYPE), positions, kc, ks, vc, vs, None,
                                    positions, cos, sin, meta) if DEVICE == "cpu" else kv_recent_attention_(
        *(x.to(DEVICE) for x in (q.to(DTYPE), new_k.to(DTYPE), new_v.to(DTYPE), positions)),
        [x.to(DEVICE) for x in kc], [x.to(DEVICE) for x in ks], [x.to(DEVICE) for x in vc],
        [x.to(DEVICE) for x in vs], None, positions.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), str(meta))
    torch.testing.assert_close(out.float().cpu(), ref, atol=TOL, rtol=TOL)
    if DEVICE == "cpu":  # the store wrote the same bytes as the reference's
        for mine, theirs in zip(kc + vc, ref_caches[0] + ref_caches[1]):
            assert torch.equal(mine, theirs)


SPECS = [
    "fp32", "fp16", "int8:per_token", "int4:per_token:g16", "int2:per_token:g16", "int3:per_token",
    "int4:per_token:scale_fp32", "fp8_e4m3:per_token", "fp8_e5m2:per_head", "fp8_e4m3:per_tensor", "nuq4:per_token",
    "nuq3:per_token:qnorm", "nuq2:per_token+outliers3%", "lm4:per_token", "lm2:per_token:g16",
    "int4:per_channel:static", "int2:per_channel:static+outliers3%",
    "nuq2:per_channel:static:channel_lut:qnorm+outliers3%", "int2:per_token:g16+outliers5%|sink=3",
    "int4:per_channel:g8|residual=16", "int2:per_channel:g16+outliers5%|residual=16",
    "int4:per_token:g16|residual=16|sink=2", "int4:per_token:g16|centre=8", "nuq3:per_token+outliers3%|sink=1|centre=8",
    "int2:per_channel:g16|residual=16|centre=8",
]


@settings(max_examples=40, deadline=None)
@given(k_spec=st.sampled_from(SPECS), v_spec=st.sampled_from(SPECS), b=st.integers(1, 2), hkv=st.integers(1, 2),
       groups=st.sampled_from([1, 2, 4]), t=st.sampled_from([1, 3]), d=st.sampled_from([32, 48]),
       s=st.sampled_from([16, 48, 80]), fill=st.floats(0.05, 1.0),
       mask_kind=st.sampled_from(["causal", "none", "bool", "float"]), rope=st.sampled_from(["", "half", "interleaved"]),
       seed=st.integers(0, 2**16))
def test_form_kernel_over_shapes_and_masks(k_spec, v_spec, b, hkv, groups, t, d, s, fill, mask_kind, rope, seed):
    # head dims that are not powers of two (48: channels masked), fill lengths, GQA, padding rows, partial RoPE
    n = max(t, math.ceil(fill * s))
    rope_batch = b if seed % 2 else 1  # batch-1 RoPE tables too
    check_against_the_reference(k_spec, v_spec, rope, b, hkv, groups, t, d, s, n, mask_kind, rope_batch,
                                torch.Generator().manual_seed(seed))


def test_what_the_form_kernel_leaves_to_the_reference():
    q = torch.randn(1, 2, 1, 32)
    assert not tl_lowering.form_attention_applies(q, AttentionMeta("int4:per_token", "int4:per_token", 32, 32, 16, 1.0,
                                                                  need_mass=True))
    assert not tl_lowering.form_attention_applies(q, AttentionMeta("lm4:per_token:hadamard|sink=2", "fp16", 32, 32,
                                                                  16, 1.0))
    assert not tl_lowering.form_attention_applies(torch.randn(1, 2, 80, 32),
                                                  AttentionMeta("int4:per_token", "fp16", 32, 32, 128, 1.0))


def test_a_tile_too_large_for_shared_memory_is_halved(monkeypatch):
    # on the GPU some layouts' gathers need shared memory in proportion to the tile: the launch retries smaller
    from kvpass.plugins import triton_decode_form as form
    from triton.runtime.errors import OutOfResources

    launched = []
    real = form._launch

    def fussy(kernel, grid, *args, **kwargs):
        launched.append(kwargs["BLOCK_N"])
        if kwargs["BLOCK_N"] > 16:
            raise OutOfResources(kwargs["BLOCK_N"] * 4096, 232448, "shared memory")
        real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(form, "_launch", fussy)
    monkeypatch.setattr(form, "_fitting", {})
    gen = torch.Generator().manual_seed(2)
    kc, ks = filled("nuq4:per_token", 1, 1, 40, 32, 40, gen)
    vc, vs = filled("int4:per_token", 1, 1, 40, 32, 40, gen)
    q = torch.randn(1, 2, 1, 32, generator=gen)
    meta = AttentionMeta("nuq4:per_token", "int4:per_token", 32, 32, 40, 32**-0.5)
    ref, _ = reference_kv_attention(q, kc, ks, vc, vs, None, None, None, None, meta)
    kc, ks, vc, vs = ([x.to(DEVICE) for x in group] for group in (kc, ks, vc, vs))
    q = q.to(DEVICE, DTYPE)
    out = tl_lowering.form_attention(q, kc, ks, vc, vs, None, None, None, None, meta)
    torch.testing.assert_close(out.float().cpu(), ref, atol=TOL, rtol=TOL)
    assert launched == [64, 32, 16]
    tl_lowering.form_attention(q, kc, ks, vc, vs, None, None, None, None, meta)
    assert launched[3:] == [16]  # remembered for the kernel's signature
