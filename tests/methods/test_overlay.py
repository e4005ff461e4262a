"""Importance overlay: MiKV (low precision + high-precision overlay), H2O and StreamingLLM eviction baselines."""

import pytest
import torch
from helpers.generation import prompt
from helpers.tiny_models import build

import kvpass
from kvpass.methods import MethodConfig, OverlayConfig
from kvpass.methods.overlay import op as ov_ops
from kvpass.ops.balance import kv_balance_

B, H, C, S, D = 1, 2, 3, 16, 4


def empty():
    return (torch.zeros(B, H, C, D), torch.zeros(B, H, C, D), torch.zeros(B, H, C, dtype=torch.int32),
            torch.zeros(B, H, S))


def store(state, positions, recent=0, sink=0, by_score=True):
    ov_k, ov_v, slot, score = state
    new = torch.arange(len(positions), dtype=torch.float32).view(1, 1, -1, 1).expand(B, H, -1, D) + 100
    ov_ops.kv_overlay_store_(ov_k, ov_v, slot, score, new, new, torch.tensor(positions), recent, sink, by_score)


def held(state):
    return sorted((state[2][0, 0] - 1).tolist())


def test_heavy_hitters_stay_and_the_lightest_is_evicted():
    state = empty()
    store(state, [0, 1, 2])
    assert held(state) == [0, 1, 2]
    state[3][:, :, :3] = torch.tensor([5.0, 1.0, 9.0])  # attention mass each token received
    store(state, [3])
    assert held(state) == [0, 2, 3]  # token 1 had the least attention
    state[3][:, :, 3] = 0.5
    store(state, [4], recent=1)  # token 3 is the newest: spared though lightest; token 0 goes
    assert held(state) == [2, 3, 4]


def test_streaming_keeps_sinks_and_evicts_the_oldest():
    state = empty()
    store(state, [0, 1, 2, 3, 4, 5], sink=1, by_score=False)
    assert held(state) == [0, 4, 5]
    overlay_k = state[0][0, 0]
    slots = state[2][0, 0] - 1
    assert overlay_k[slots.tolist().index(5), 0] == 105  # the entry holds the row written for token 5


def test_overlay_ops_opcheck():
    state = empty()
    store(state, [0, 1])
    new = torch.randn(B, H, 1, D)
    torch.library.opcheck(ov_ops.kv_overlay_store_, (*state, new, new, torch.tensor([2]), 1, 0, True))
    q = torch.randn(B, 2 * H, 1, D)
    torch.library.opcheck(kv_balance_, (torch.ones(B, H, 1, D), q, new, torch.tensor([0])))
    for evict in (True, False):
        lists = ([], [], [], []) if evict else None
        if not evict:
            from kvpass.kvcache import CacheLayout

            kc, ks = CacheLayout.build("int4:per_token", (B, H, S, D), torch.float32).allocate()
            lists = (kc, ks, kc, ks)
        spec = "" if evict else "int4:per_token"
        meta = ov_ops.OverlayMeta(spec, spec, S, 0.5, evict, True)
        torch.library.opcheck(ov_ops.kv_overlay_attention_, (q, *lists, None, torch.tensor([2]), *state, str(meta)))


FULL_OVERLAY = MethodConfig("mikv-100", "MiKV with every token in the overlay", "int2:per_token", "int2:per_token",
                            overlay=OverlayConfig(budget=1.0, recent=4, high="none"), max_chunk=8, balance=True)


def test_full_overlay_equals_the_high_precision_method():
    model = build("llama")
    ids, mask = prompt(2, length=20)
    fp = kvpass.compile(model, "fp16", max_cache_len=48, batch_size=2)
    full = kvpass.compile(model, FULL_OVERLAY, max_cache_len=48, batch_size=2)
    torch.testing.assert_close(full(ids, attention_mask=mask), fp(ids, attention_mask=mask), rtol=1e-5, atol=1e-5)
    assert torch.equal(full.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[]),
                       fp.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[]))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", ["mikv", "h2o", "streaming"])
def test_importance_methods_generate_and_account_bytes(arch, method):
    qm = kvpass.compile(build(arch), method, max_cache_len=64, batch_size=2)
    ids, mask = prompt(2, length=30)
    out = qm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert out.shape == (2, 38)
    report = qm.cache_report()
    real = sum(b.numel() * b.element_size() for n, b in qm.graph_module.named_buffers() if n.startswith("kvpass_"))
    assert report.nbytes == real == sum(layout.nbytes for layout in qm.layouts)
    slots = qm.graph_module.kvpass_cache_0_overlay_slot - 1
    capacity = qm.method.overlay.capacity(64)
    assert slots.shape[-1] == capacity
    assert ((slots >= 0).sum(-1) == capacity).all()  # 37 cached tokens fill an overlay of 33 (51%) or 13 (20%)
    assert (slots == 36).any(-1).all()  # the newest cached token is always held
    if method == "streaming":
        assert ((slots >= 0) & (slots < 4)).sum(-1).eq(4).all()  # the four sinks stay


def test_mikv_beats_h2o_at_about_the_same_memory():
    model = build("llama")
    ids, mask = prompt(2, length=40)
    fp = kvpass.compile(model, "fp16", max_cache_len=64, batch_size=2)
    ref = fp(ids, attention_mask=mask)
    errs, bits = {}, {}
    for m in ("mikv", "h2o"):
        qm = kvpass.compile(model, m, max_cache_len=64, batch_size=2)
        errs[m] = float((qm(ids, attention_mask=mask) - ref)[mask.bool()].pow(2).mean())
        bits[m] = qm.method.nominal_bits(head_dim=128)
    assert abs(bits["mikv"] - bits["h2o"]) < 0.5
    assert errs["mikv"] < errs["h2o"]


def test_balancer_keeps_scores_and_shrinks_key_outlier_channels():
    import torch.nn.functional as F

    from kvpass.formats import quantize

    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 64, 32, generator=g)
    k[..., [3, 20]] *= 20.0
    q = torch.randn(1, 4, 64, 32, generator=g)
    v = torch.randn(1, 2, 64, 32, generator=g)
    scale = torch.ones(1, 2, 1, 32)
    kv_balance_(scale, q, k, torch.arange(64))
    qs = q * scale.repeat_interleave(2, 1)
    ks = k / scale
    torch.testing.assert_close(qs @ ks.repeat_interleave(2, 1).transpose(-1, -2),
                               q @ k.repeat_interleave(2, 1).transpose(-1, -2), rtol=1e-4, atol=1e-3)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    plain = F.scaled_dot_product_attention(q, quantize(k, "int2:per_token").dequantize(), v, enable_gqa=True)
    balanced = F.scaled_dot_product_attention(qs, quantize(ks, "int2:per_token").dequantize(), v, enable_gqa=True)
    assert (balanced - ref).pow(2).mean() < 0.7 * (plain - ref).pow(2).mean()
    before = scale.clone()
    kv_balance_(scale, q, k * 3, torch.arange(64, 70))  # later chunks keep the scale of the sequence
    assert torch.equal(scale, before)
