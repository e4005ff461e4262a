"""Recent tokens read at model precision per query, in prompts as in decoding: the ``recent=W`` cache option and
KIVI's ``residual=R`` through ``kv_recent_attention_``."""

import pytest
import torch
import torch.nn.functional as F
from helpers.generation import prompt, reference
from helpers.tiny_models import build

import kvpass
from kvpass.kvcache import CacheLayout, parse_cache_spec
from kvpass.methods import MethodConfig, OverlayConfig
from kvpass.ops import cache as ops
from kvpass.ops.meta import AttentionMeta, CacheRead
from kvpass.ops.recent import kv_recent_attention_

B, HKV, HQ, S, D, W = 2, 2, 4, 40, 16, 5
NO_ROPE = (None, None)


def data(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, HQ, t, D, generator=g), torch.randn(B, HKV, t, D, generator=g),
            torch.randn(B, HKV, t, D, generator=g))


def run(k_spec, v_spec, chunks, seed=0, s=S):
    """Store and attend ``sum(chunks)`` tokens chunk by chunk in a cache of ``s`` slots; the outputs of every query,
    in order."""
    q, k, v = data(sum(chunks), seed)
    kc, ks = CacheLayout.build(k_spec, (B, HKV, s, D), torch.float32).allocate()
    vc, vs = CacheLayout.build(v_spec, (B, HKV, s, D), torch.float32).allocate()
    outs, start = [], 0
    for n in chunks:
        pos = torch.arange(start, start + n)
        outs.append(kv_recent_attention_(q[:, :, pos], k[:, :, pos], v[:, :, pos], pos, kc, ks, vc, vs, None, pos,
                                         *NO_ROPE, str(AttentionMeta(k_spec, v_spec, D, D, s, 0.25))))
        start += n
    return torch.cat(outs, 2), (q, k, v), (kc, ks, vc, vs)


def per_query_reference(k_spec, v_spec, q, k, v, s=S):
    """Each query on its own, as decoding sees the cache: the tokens up to it stored one at a time and read back, with
    those its window (the last W) or its incomplete residual block (KIVI) holds replaced by the exact tokens."""
    t = q.shape[2]
    kc, ks = CacheLayout.build(k_spec, (B, HKV, s, D), torch.float32).allocate()
    vc, vs = CacheLayout.build(v_spec, (B, HKV, s, D), torch.float32).allocate()
    out = []
    for i in range(t):
        pos = torch.tensor([i])
        ops.kv_store_(kc, ks, k[:, :, pos], pos, k_spec)
        ops.kv_store_(vc, vs, v[:, :, pos], pos, v_spec)
        ki = ops.kv_load(kc, ks, *NO_ROPE, torch.float32, str(CacheRead(k_spec, D, s)))[:, :, :i + 1]
        vi = ops.kv_load(vc, vs, *NO_ROPE, torch.float32, str(CacheRead(v_spec, D, s)))[:, :, :i + 1]
        for x, exact, spec in ((ki, k, k_spec), (vi, v, v_spec)):
            cs = parse_cache_spec(spec)
            if cs.recent:
                lo = max(0, i + 1 - cs.recent)
                x[:, :, lo:i + 1] = exact[:, :, lo:i + 1]
            elif cs.residual:  # kv_load already reads the incomplete block from the ring
                lo = (i + 1) // cs.residual * cs.residual
                assert torch.equal(x[:, :, lo:i + 1], exact[:, :, lo:i + 1])
        out.append(F.scaled_dot_product_attention(q[:, :, i:i + 1], ki, vi, scale=0.25, enable_gqa=True))
    return torch.cat(out, 2)


@pytest.mark.parametrize("k_spec,v_spec", [
    (f"int2:per_token|recent={W}", f"int2:per_token|recent={W}"),
    (f"int2:per_token|recent={W}", "int2:per_token"),  # a window on one side only
    ("int3:per_token|sink=1", "int2:per_token|recent=3|sink=1"),
    ("int2:per_channel:g4|residual=8", "int2:per_token|residual=8"),  # KIVI
    ("int2:per_channel:g4|residual=8", "int2:per_token|recent=3"),
])
def test_each_query_reads_its_own_window_exactly(k_spec, v_spec):
    out, (q, k, v), _ = run(k_spec, v_spec, [17])
    torch.testing.assert_close(out, per_query_reference(k_spec, v_spec, q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k_spec,v_spec", [(f"int2:per_token|recent={W}", f"int2:per_token|recent={W}"),
                                            ("int2:per_channel:g4|residual=8", "int2:per_token:g4|residual=8")])
def test_prompt_chunks_and_decoding_give_the_same_outputs(k_spec, v_spec):
    one, _, (kc, _, vc, _) = run(k_spec, v_spec, [23])
    # chunks that start inside a residual block and run past the next one must read the block's older tokens
    # before the chunk overwrites them in the ring
    for chunks in ([1] * 23, [3, 9, 1, 10], [W, W, 13], [2, 21]):
        other, _, (kc2, _, vc2, _) = run(k_spec, v_spec, chunks)
        torch.testing.assert_close(other, one, rtol=1e-5, atol=1e-5)
        for a, b in zip(kc + vc, kc2 + vc2):
            assert torch.equal(a, b)  # the codes and the ring end the same


@pytest.mark.parametrize("k_spec,v_spec", [
    (f"int2:per_token|recent={W}", f"int2:per_token|recent={W}"),
    ("int2:per_channel:g4|residual=8", "int2:per_token|recent=3"),
    ("int2:per_token|recent=40", "int2:per_token|recent=40"),  # a band longer than the 32-query blocks
])
def test_long_prompts_read_as_decoding_across_query_blocks(k_spec, v_spec):
    # the near part goes in blocks of max(w, 32) queries: 100 queries span several, the last one padded
    out, (q, k, v), _ = run(k_spec, v_spec, [100], s=112)
    torch.testing.assert_close(out, per_query_reference(k_spec, v_spec, q, k, v, s=112), rtol=1e-5, atol=1e-5)
    split, _, _ = run(k_spec, v_spec, [37, 1, 62], s=112)
    torch.testing.assert_close(split, out, rtol=1e-5, atol=1e-5)


def test_window_changes_the_output_and_a_window_over_everything_is_exact():
    coded, (q, k, v), _ = run("int2:per_token", "int2:per_token", [20])
    windowed, _, _ = run(f"int2:per_token|recent={W}", f"int2:per_token|recent={W}", [20])
    exact, _, _ = run("int2:per_token|recent=20", "int2:per_token|recent=20", [20])
    mask = torch.ones(20, 20).tril().bool()
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(exact, full, rtol=1e-5, atol=1e-5)
    err = lambda x: float((x - full).norm() / full.norm())
    assert err(windowed) < 0.8 * err(coded)


def test_ring_bytes_and_opcheck():
    spec = f"int2:per_token|recent={W}"
    base = CacheLayout.build("int2:per_token", (B, HKV, S, D), torch.float16)
    layout = CacheLayout.build(spec, (B, HKV, S, D), torch.float16)
    assert layout.nbytes == base.nbytes + B * HKV * W * D * 2  # the ring, in the model's dtype
    _, (q, k, v), (kc, ks, vc, vs) = run(spec, spec, [12])
    pos = torch.tensor([12])
    torch.library.opcheck(kv_recent_attention_, (q[:, :, :1], k[:, :, :1], v[:, :, :1], pos, kc, ks, vc, vs, None, pos,
                                                 *NO_ROPE, str(AttentionMeta(spec, spec, D, D, S, 0.25))))


@pytest.mark.parametrize("arch,k_spec,v_spec,length", [
    ("llama", "int2:per_token|recent=4", "int2:per_token|recent=4", 20),
    # 80 tokens: the near part's blocks of 32 queries, the window's pre-RoPE keys rotated at their own positions in each
    ("llama", "int2:per_token|recent=4", "int2:per_token|recent=4", 80),
    ("gpt2", "int2:per_token|recent=4", "int2:per_token|recent=4", 20),
    ("qwen2", "int2:per_channel:g4|residual=8", "int2:per_token:g4|residual=8", 20),  # KIVI with small blocks
])
def test_model_prompt_equals_token_by_token_decoding(arch, k_spec, v_spec, length):
    model = build(arch)
    m = MethodConfig("recent-exact", "", k_spec, v_spec, pre_rope_keys=arch == "llama")
    cache = max(48, length + 16)
    qm = kvpass.compile(model, m, max_cache_len=cache, batch_size=2)
    ids, mask = prompt(2, length=length)
    whole = qm(ids, attention_mask=mask)
    qm.reset()
    steps = torch.cat([qm(ids[:, i:i + 1], attention_mask=mask[:, :i + 1]) for i in range(length)], 1)
    real = mask.bool()
    torch.testing.assert_close(steps[real], whole[real], rtol=1e-4, atol=1e-4)
    # reading the cache as it stands after the whole prompt (kv_attention) differs
    as_stored = kvpass.compile(model, m, max_cache_len=cache, batch_size=2, attention="load") if "residual" in k_spec \
        else kvpass.compile(model, MethodConfig("int2", "", "int2:per_token", "int2:per_token",
                                                pre_rope_keys=arch == "llama"), max_cache_len=cache, batch_size=2)
    assert not torch.allclose(as_stored(ids, attention_mask=mask)[real], whole[real], atol=1e-3)


def test_window_longer_than_the_text_is_exact_with_pre_rope_keys():
    model = build("llama")
    ids, mask = prompt(2)
    seq, ref_prefill, _ = reference(model, ids, mask)
    spec = "int2:per_token|recent=48"
    qm = kvpass.compile(model, MethodConfig("w48", "", spec, spec, pre_rope_keys=True), max_cache_len=48, batch_size=2)
    real = mask.bool()
    torch.testing.assert_close(qm(ids, attention_mask=mask)[real], ref_prefill[real], rtol=1e-5, atol=1e-5)
    qm.reset()
    assert torch.equal(qm.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[]), seq)


def test_recent_window_errors():
    with pytest.raises(kvpass.KVPassError, match="use one of residual and recent"):
        parse_cache_spec("int2:per_channel:g4|residual=8|recent=4")
    with pytest.raises(kvpass.KVPassError, match="overlay does not use"):
        MethodConfig("bad", "", "int4|recent=4", "int4", overlay=OverlayConfig(0.2))
    spec = "int2:per_token|recent=4"
    with pytest.raises(kvpass.KVPassError, match="would ignore the recent window"):
        kvpass.compile(build("llama"), MethodConfig("w", "", spec, spec), max_cache_len=48, attention="load")
    _, (q, k, v), (kc, ks, vc, vs) = run(spec, spec, [6])
    with pytest.raises(kvpass.KVPassError, match="consecutive positions"):
        pos = torch.tensor([6, 8])
        kv_recent_attention_(q[:, :, :2], k[:, :, :2], v[:, :, :2], pos, kc, ks, vc, vs, None, pos, *NO_ROPE,
                             str(AttentionMeta(spec, spec, D, D, S, 0.25)))


def test_rewritten_module_with_a_window_reexports_and_compiles():
    spec = "int2:per_token|recent=4"
    qm = kvpass.compile(build("llama"), MethodConfig("w", "", spec, spec, pre_rope_keys=True), max_cache_len=32,
                        batch_size=2)
    ids, mask = prompt(2, length=6)
    expected = qm(ids, attention_mask=mask)
    full_mask = torch.ones(2, 32, dtype=torch.long)
    full_mask[:, :6] = mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    args = (ids, torch.arange(6), full_mask, positions)
    qm.reset()
    tokens = torch.export.Dim("tokens", min=1, max=32)
    ep = torch.export.export(qm.graph_module, args, dynamic_shapes=({1: tokens}, {0: tokens}, None, {1: tokens}),
                             strict=False)
    assert torch.ops.kvpass.kv_recent_attention_.default in {n.target for n in ep.graph.nodes}
    qm.reset()
    torch.testing.assert_close(ep.module()(*args), expected, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(qm.graph_module, backend="inductor")
    qm.reset()
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), expected, rtol=1e-4, atol=1e-4)
