"""The native CPU kernels (plugins/cpu_attention.cpp) against the reference kernels they lower: every spec the
methods use, over shapes, fill lengths, GQA ratios, masks (causal, bool with padding rows, additive), keys stored
before RoPE and the attention mass. fp32 throughout: agreement within 2e-5 (the kernel sums in another order and
uses its own exp)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers.caches import filled, make_mask, rope_tables
from hypothesis import given, settings
from hypothesis import strategies as st
from kvpass.lowering import cpu, cpu_build

from kvpass import kvcache
from kvpass.kvcache import CacheLayout
from kvpass.ops.attention import load_keys
from kvpass.ops.cache import kv_attention, reference_kv_attention
from kvpass.ops.meta import AttentionMeta

pytestmark = pytest.mark.skipif(not cpu_build.available(), reason=f"native CPU kernels unavailable: {cpu_build.load()}")

SPECS = [
    "fp32", "fp16", "bf16",
    "int8:per_token", "int4:per_token:g16", "int2:per_token:g16", "int3:per_token", "int4:per_token:scale_fp32",
    "fp8_e4m3:per_token", "fp8_e5m2:per_head", "fp8_e4m3:per_tensor",
    "nuq4:per_token", "nuq3:per_token:qnorm", "nuq2:per_token+outliers3%", "lm4:per_token", "lm2:per_token:g16",
    "int4:per_channel:static", "int2:per_channel:static+outliers3%",
    "nuq2:per_channel:static:channel_lut:qnorm+outliers3%", "nuq4:per_channel:static:channel_lut",
    "int2:per_token:g16+outliers5%|sink=3", "nuq3:per_token|sink=1",
    "int4:per_channel:g8|residual=16", "int2:per_channel:g16+outliers5%|residual=16",
    "int2:per_token:g16|residual=16", "int4:per_token:g16|residual=16|sink=2",
    "int4:per_token:g16|centre=8", "nuq3:per_token+outliers3%|sink=1|centre=8", "int2:per_channel:g16|residual=16|centre=8",
]
ATOL = 2e-5


@settings(max_examples=60, deadline=None)
@given(
    k_spec=st.sampled_from(SPECS), v_spec=st.sampled_from(SPECS), b=st.integers(1, 2), hkv=st.integers(1, 2),
    groups=st.sampled_from([1, 2, 3, 4]), t=st.sampled_from([1, 1, 3]), s=st.sampled_from([16, 48, 80]),
    fill=st.floats(0.05, 1.0), mask_kind=st.sampled_from(["causal", "causal", "none", "bool", "float"]),
    rope=st.sampled_from(["", "", "half", "interleaved"]), need_mass=st.booleans(), seed=st.integers(0, 2**16),
)
def test_native_attention_equals_the_reference(k_spec, v_spec, b, hkv, groups, t, s, fill, mask_kind, rope,
                                               need_mass, seed):
    gen = torch.Generator().manual_seed(seed)
    d = 32
    n = max(t, math.ceil(fill * s))
    kc, ks = filled(k_spec, b, hkv, s, d, n, gen)
    vc, vs = filled(v_spec, b, hkv, s, d, n, gen)
    q = torch.randn(b, hkv * groups, t, d, generator=gen)
    cos, sin = rope_tables(b, s, 16, gen) if rope else (None, None)
    mask, q_positions = make_mask(mask_kind, b, t, s, n, gen)
    meta = AttentionMeta(k_spec, v_spec, d, d, s, d**-0.5, rope=rope, rotary_dim=16 if rope else 0, need_mass=need_mass)
    assert cpu.applies(q, meta)
    out, mass = kv_attention(q, kc, ks, vc, vs, mask, q_positions, cos, sin, str(meta))
    ref_out, ref_mass = reference_kv_attention(q, kc, ks, vc, vs, mask, q_positions, cos, sin, meta)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=1e-4)
    if need_mass:
        torch.testing.assert_close(mass, ref_mass, atol=ATOL, rtol=1e-4)


ROTATED = ["lm4:per_token:hadamard", "lm3:per_token:g16:hadamard", "int4:per_token:g16:hadamard",
           "lm8:per_token:hadamard", "fp8_e4m3:per_token:hadamard", "lm4:per_token:hadamard|centre=8"]


@settings(max_examples=30, deadline=None)
@given(k_spec=st.sampled_from(ROTATED + ["lm4:per_token:hadamard+outliers3%", "lm3:per_token:hadamard+outliers5%|centre=8",
                                          "int4:per_token"]),
       v_spec=st.sampled_from(ROTATED + ["fp16"]),
       groups=st.sampled_from([1, 3]), t=st.sampled_from([1, 3]), d=st.sampled_from([32, 48]),
       mask_kind=st.sampled_from(["causal", "bool"]), seed=st.integers(0, 2**16))
def test_rotated_codes_are_read_natively_in_the_rotated_space(k_spec, v_spec, groups, t, d, mask_kind, seed):
    # the query is rotated for rotated keys and the output rotated back for rotated values (48 = 32 + 16 blocks); key
    # outliers, kept outside the rotation, reach the kernel as additive scores
    gen = torch.Generator().manual_seed(seed)
    b, hkv, s, n = 2, 2, 40, 29
    kc, ks = filled(k_spec, b, hkv, s, d, n, gen)
    vc, vs = filled(v_spec, b, hkv, s, d, n, gen)
    q = torch.randn(b, hkv * groups, t, d, generator=gen)
    mask, q_positions = make_mask(mask_kind, b, t, s, n, gen)
    meta = AttentionMeta(k_spec, v_spec, d, d, s, d**-0.5, need_mass=True)
    assert cpu.applies(q, meta)
    out, mass = kv_attention(q, kc, ks, vc, vs, mask, q_positions, None, None, str(meta))
    ref_out, ref_mass = reference_kv_attention(q, kc, ks, vc, vs, mask, q_positions, None, None, meta)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(mass, ref_mass, atol=ATOL, rtol=1e-4)
    # keys stored before RoPE (RoPE does not commute with the Hadamard), model-precision rows beside rotated codes and
    # value outliers: each decoded row is rotated back in the kernel (a fast Hadamard transform)
    cos, sin = rope_tables(b, s, d, gen)
    for k_read, v_read in ((k_spec, "lm4:per_token:hadamard|sink=2"), (k_spec, "lm3:per_token:hadamard+outliers3%"),
                           ("lm4:per_token:hadamard+outliers3%|recent=4|centre=8", v_spec)):
        kc2, ks2 = filled(k_read, b, hkv, s, d, n, gen)
        vc2, vs2 = filled(v_read, b, hkv, s, d, n, gen)
        meta = AttentionMeta(k_read, v_read, d, d, s, d**-0.5, rope="half", rotary_dim=d)
        assert cpu.applies(q, meta) and not cpu.reads_rotated(meta.key_spec, meta.key_read)
        out, _ = kv_attention(q, kc2, ks2, vc2, vs2, mask, q_positions, cos, sin, str(meta))
        ref_out, _ = reference_kv_attention(q, kc2, ks2, vc2, vs2, mask, q_positions, cos, sin, meta)
        torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("spec", SPECS)
def test_decoded_slots_equal_the_reference_load(spec):
    gen = torch.Generator().manual_seed(1)
    b, h, s, d, n = 2, 2, 48, 32, 37
    cache, static = filled(spec, b, h, s, d, n, gen)
    cos, sin = rope_tables(b, s, d, gen)
    meta = AttentionMeta(spec, spec, d, d, s, 1.0, rope="half", rotary_dim=d)
    ref = load_keys(cache, static, meta.key_read, torch.float32, cos, sin)
    got = cpu.decode_slots(cache, static, meta.key_read, cos, sin, 5, 41)
    torch.testing.assert_close(got, ref[:, :, 5:41], atol=1e-5, rtol=1e-6)


def test_long_prompt_chunks_and_unsupported_specs_run_the_reference():
    q = torch.zeros(1, 4, cpu.MAX_ROWS // 4 + 1, 32)
    meta = AttentionMeta("int4:per_token", "int4:per_token", 32, 32, 64, 1.0)
    assert not cpu.applies(q, meta) and cpu.applies(q[:, :, :1], meta)
    assert not cpu.supports(kvcache.parse_cache_spec("fp16|residual=16"), 32)
    assert not cpu.supports(kvcache.parse_cache_spec("int4:per_token"), cpu.MAX_DIM + 1)


def test_a_failed_build_warns_with_the_fix_and_leaves_the_reference(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'kvpass_cpu': c++: not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        reason = cpu_build.load.__wrapped__()
    assert "c++: not found" in reason
    assert any("Install a C++ compiler" in str(w.message) for w in seen)
    monkeypatch.setenv("KVPASS_CPU_KERNELS", "0")
    assert cpu_build.load.__wrapped__() == "turned off by KVPASS_CPU_KERNELS=0"


STORE_SPECS = ["int8:per_token", "int4:per_token:g16", "int2:per_token:g16", "int3:per_token", "int5:per_token:g8",
               "int4:per_token:scale_fp32", "fp8_e4m3:per_token", "fp8_e5m2:per_token", "int4:per_token:g16|sink=2",
               "int2:per_token:g32|recent=4"]


@settings(max_examples=30, deadline=None)
@given(spec=st.sampled_from(STORE_SPECS), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       magnitude=st.sampled_from([1e-3, 1.0, 30.0]), t=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_native_store_writes_the_reference_bytes(spec, dtype, magnitude, t, seed):
    from kvpass.ops.cache import kv_store_

    gen = torch.Generator().manual_seed(seed)
    layout = CacheLayout.build(spec, (2, 3, 24, 32), dtype)
    assert cpu.stores_natively(layout.spec)
    ref, ref_static = layout.allocate()
    got, got_static = layout.allocate()
    for start in (0, t):
        x = (torch.randn(2, 3, t, 32, generator=gen) * magnitude).to(dtype)
        x[0, 0, 0, :8] = x[0, 0, 0, 0]  # a constant group: scale 0
        positions = torch.arange(start, start + t)
        kvcache.store(ref, ref_static, x, positions, layout.spec)
        kv_store_(got, got_static, x, positions, spec)
    for a, b in zip(ref, got):
        assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a, b.view(torch.uint8) if b.element_size() == 1 else b)


WINDOW_SPECS = [("int2:per_channel:g16|residual=32", "int2:per_token:g16|residual=32"),
                ("nuq2:per_channel:static:channel_lut:qnorm+outliers3%|sink=1|recent=8", "nuq2:per_token+outliers3%|sink=1|recent=8"),
                ("int4:per_token:g16|recent=8", "fp16")]


@settings(max_examples=25, deadline=None)
@given(specs=st.sampled_from(WINDOW_SPECS), t=st.sampled_from([1, 1, 5]), groups=st.sampled_from([1, 3]),
       fill=st.integers(0, 70), rope=st.booleans(), mask_kind=st.sampled_from(["causal", "bool"]),
       seed=st.integers(0, 2**16))
def test_window_op_reads_natively_as_the_reference(specs, t, groups, fill, rope, mask_kind, seed):
    """``kv_recent_attention_`` as dispatched on the CPU (one token: one fused call reading the rings; a chunk: the
    far part fused, only the band decoded) against the reference reads, from the same cache state; the caches it
    writes are the same bytes."""
    from kvpass.ops.recent import kv_recent_attention_, recent_attention, reference_reads

    gen = torch.Generator().manual_seed(seed)
    b, hkv, s, d = 2, 2, 96, 32
    k_spec, v_spec = specs
    caches = [filled(spec, b, hkv, s, d, fill, gen) for spec in specs]
    twins = [([c.clone() for c in cache], static) for cache, static in caches]
    q = torch.randn(b, hkv * groups, t, d, generator=gen)
    new_k, new_v = torch.randn(b, hkv, t, d, generator=gen), torch.randn(b, hkv, t, d, generator=gen)
    positions = torch.arange(fill, fill + t)
    cos, sin = rope_tables(b, s, d, gen) if rope else (None, None)
    mask = None
    if mask_kind == "bool":
        mask = (torch.arange(s)[None, :] <= positions[:, None]).expand(b, 1, t, s).clone()
        mask[1, :, :, :3] = False  # left padding of the second row
    meta = AttentionMeta(k_spec, v_spec, d, d, s, d**-0.5, rope="half" if rope else "", rotary_dim=d if rope else 0)
    got = kv_recent_attention_(q, new_k, new_v, positions, *caches[0], *caches[1], mask, positions, cos, sin, str(meta))
    ref = recent_attention(q, new_k, new_v, positions, *twins[0], *twins[1], mask, positions, cos, sin, meta,
                           reads=reference_reads)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-4)
    for (a, _), (r, _) in zip(caches, twins):
        assert all(torch.equal(x, y) for x, y in zip(a, r))


@settings(max_examples=40, deadline=None)
@given(evict=st.booleans(), accumulate=st.booleans(), t=st.sampled_from([1, 1, 4]), groups=st.sampled_from([1, 3]),
       fill=st.integers(4, 60), mask_kind=st.sampled_from(["causal", "bool", "float"]), seed=st.integers(0, 2**16))
def test_overlay_op_natively_equals_the_reference(evict, accumulate, t, groups, fill, mask_kind, seed):
    """MiKV (the int4 cache with high-precision rows substituted) and H2O / StreamingLLM (the overlay alone) through
    the native kernel against the reference: output and the scores the attention mass accumulates into."""
    from kvpass.methods.overlay.op import OverlayMeta, kv_overlay_attention_, reference_overlay_attention

    gen = torch.Generator().manual_seed(seed)
    b, hkv, s, d, c = 2, 2, 64, 32, 12
    spec = "" if evict else "int4:per_token:g16"
    kc, ks = filled(spec or "fp16", b, hkv, s, d, fill, gen)
    vc, vs = filled(spec or "fp16", b, hkv, s, d, fill, gen)
    if evict:
        kc, ks, vc, vs = [], [], [], []
    ov_k = torch.randn(b, hkv, c, d, generator=gen).half()
    ov_v = torch.randn(b, hkv, c, d, generator=gen).half()
    slot = torch.stack([torch.randperm(fill, generator=gen)[:c] for _ in range(b * hkv)]).reshape(b, hkv, -1) + 1
    slot = torch.nn.functional.pad(slot, (0, c - slot.shape[-1])).to(torch.int32)  # short fills leave entries empty
    slot[0, 0, -1] = 0
    score = torch.rand(b, hkv, s, generator=gen)
    q = torch.randn(b, hkv * groups, t, d, generator=gen)
    mask, q_positions = make_mask(mask_kind, b, t, s, fill, gen)
    meta = OverlayMeta(spec, spec, s, d**-0.5, evict=evict, accumulate=accumulate)
    ref_score = score.clone()
    got = kv_overlay_attention_(q, kc, ks, vc, vs, mask, q_positions, ov_k, ov_v, slot, score, str(meta))
    ref = reference_overlay_attention(q, kc, ks, vc, vs, mask, q_positions, ov_k, ov_v, slot, ref_score, meta)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(score, ref_score, atol=ATOL, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(by_score=st.booleans(), recent=st.sampled_from([0, 3]), sink=st.sampled_from([0, 2]),
       chunks=st.lists(st.integers(1, 5), min_size=1, max_size=6), rewrite=st.booleans(),
       dtype=st.sampled_from([torch.float16, torch.float32]), seed=st.integers(0, 2**16))
def test_native_overlay_store_leaves_the_reference_state(by_score, recent, sink, chunks, rewrite, dtype, seed):
    """Prompt chunks then tokens into an overlay smaller than the text: the same entries, slots, rows and scores
    as the reference's one-token-at-a-time loop (rewriting a slot drops the entry that held it)."""
    from kvpass.methods.overlay.op import kv_overlay_store_, reference_overlay_store

    gen = torch.Generator().manual_seed(seed)
    b, h, c, d, s = 2, 2, 5, 8, 40
    state = [torch.zeros(b, h, c, d, dtype=dtype), torch.zeros(b, h, c, d, dtype=dtype),
             torch.zeros(b, h, c, dtype=torch.int32), torch.zeros(b, h, s)]
    twin = [x.clone() for x in state]
    start = 0
    for size in chunks + ([2] if rewrite else []):
        if rewrite and size == 2 and start > 4:
            start = 2  # write over slots already held
        new_k, new_v = torch.randn(b, h, size, d, generator=gen), torch.randn(b, h, size, d, generator=gen)
        positions = torch.arange(start, start + size)
        kv_overlay_store_(*state, new_k, new_v, positions, recent, sink, by_score)
        reference_overlay_store(*twin, new_k, new_v, positions, recent, sink, by_score)
        bump = torch.rand(b, h, s, generator=gen)  # the attention that accumulates between writes
        state[3] += bump
        twin[3] += bump
        start += size
    for got, ref in zip(state, twin):
        assert torch.equal(got, ref)


def test_rope_tables_of_batch_one_serve_every_sequence():
    # position ids without padding give [1, 1, S, r] tables beside a batch of several sequences
    gen = torch.Generator().manual_seed(5)
    b, h, s, d = 2, 2, 40, 32
    spec = "nuq4:per_channel:static:channel_lut|sink=1"
    kc, ks = filled(spec, b, h, s, d, s, gen)
    vc, vs = filled("int4:per_token", b, h, s, d, s, gen)
    cos, sin = rope_tables(1, s, d, gen)
    q = torch.randn(b, 4, 1, d, generator=gen)
    meta = AttentionMeta(spec, "int4:per_token", d, d, s, d**-0.5, rope="half", rotary_dim=d)
    out = kv_attention(q, kc, ks, vc, vs, None, None, cos, sin, str(meta))[0]
    ref = reference_kv_attention(q, kc, ks, vc, vs, None, None, cos, sin, meta)[0]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)
