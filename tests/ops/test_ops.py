"""The kvpass custom ops: opcheck, agreement with plain attention, export and Inductor compile."""

import pytest
import torch
import torch.nn.functional as F

from kvpass.formats import quantize
from kvpass.kvcache import CacheLayout
from kvpass.ops import cache as ops
from kvpass.ops.meta import AttentionMeta, CacheRead

SPECS = ["none", "fp16", "int8:per_token", "int4:per_token:g16", "int2:per_token:g16+outliers5%",
         "nuq3:per_token", "nuq2:per_token:qnorm", "fp8_e4m3:per_token", "fp8_e5m2"]
B, HKV, HQ, S, D = 2, 2, 4, 16, 32
NO_ROPE = (None, None)


def filled(spec, seed=0, t=6):
    g = torch.Generator().manual_seed(seed)
    layout = CacheLayout.build(spec, (B, HKV, S, D), torch.float32)
    cache, static = layout.allocate()
    new = torch.randn(B, HKV, t, D, generator=g)
    pos = torch.arange(t)
    ops.kv_store_(cache, static, new, pos, spec)
    return layout, cache, static, new, pos


@pytest.mark.parametrize("spec", SPECS)
def test_opcheck(spec):
    _, kc, ks, new, pos = filled(spec)
    _, vc, vs, _, _ = filled(spec, seed=1)
    torch.library.opcheck(ops.kv_store_, (kc, ks, new, pos, spec))
    torch.library.opcheck(ops.kv_load, (kc, ks, None, None, torch.float32, str(CacheRead(spec, D, S))))
    q = torch.randn(B, HQ, 3, D)
    for mask, qpos, need in [(None, torch.tensor([3, 4, 5]), True), (None, torch.tensor([3, 4, 5]), False),
                             (torch.ones(B, 1, 3, S, dtype=torch.bool).tril(3), None, True)]:
        torch.library.opcheck(ops.kv_attention, (q, kc, ks, vc, vs, mask, qpos, None, None,
                                                    str(AttentionMeta(spec, spec, D, D, S, D**-0.5, need_mass=need))))


@pytest.mark.parametrize("spec", SPECS)
def test_store_then_load_matches_the_format(spec):
    _, cache, static, new, _ = filled(spec)
    loaded = ops.kv_load(cache, static, None, None, torch.float32, str(CacheRead(spec, D, S)))
    expected = quantize(new, spec).dequantize() if spec not in ("fp8_e5m2",) else None
    if expected is not None and "qnorm" not in spec:
        torch.testing.assert_close(loaded[:, :, : new.shape[2]], expected.float(), rtol=0, atol=1e-6)
    assert (loaded[:, :, new.shape[2]:] == 0).all() or spec.startswith("nuq")


def test_store_writes_only_its_positions():
    _, cache, static, _, _ = filled("int4:per_token:g16", t=4)
    before = [c.clone() for c in cache]
    ops.kv_store_(cache, static, torch.randn(B, HKV, 2, D), torch.tensor([9, 11]), "int4:per_token:g16")
    for b, a in zip(before, cache):
        changed = (b != a).flatten(3).any(-1).any(0).any(0)
        assert set(changed.nonzero().flatten().tolist()) <= {9, 11}
        assert torch.equal(b[:, :, :9], a[:, :, :9])


def test_unquantized_attention_equals_sdpa_and_mass_sums_to_queries():
    _, kc, ks, k, pos = filled("none")
    _, vc, vs, v, _ = filled("none", seed=1)
    q = torch.randn(B, HQ, 6, D)
    out, mass = ops.kv_attention(q, kc, ks, vc, vs, None, pos, *NO_ROPE,
                                 str(AttentionMeta("none", "none", D, D, S, D**-0.5, need_mass=True)))
    kk = torch.zeros(B, HKV, S, D)
    kk[:, :, :6] = k
    vv = torch.zeros(B, HKV, S, D)
    vv[:, :, :6] = v
    mask = torch.arange(S)[None, :] <= pos[:, None]
    ref = F.scaled_dot_product_attention(q, kk.repeat_interleave(2, 1), vv.repeat_interleave(2, 1), attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert mass.shape == (B, HKV, S)
    torch.testing.assert_close(mass.sum(-1), torch.full((B, HKV), 2.0 * 6))  # 6 queries x 2 heads per group
    assert (mass[:, :, 6:] == 0).all()
    # the first cached token is seen by every query; the last only by the last query
    assert (mass[:, :, 0] >= mass[:, :, 5]).all()


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_given_mask_is_used(mask_kind):
    _, kc, ks, _, _ = filled("int8:per_token")
    _, vc, vs, _, _ = filled("int8:per_token", seed=1)
    q = torch.randn(B, HQ, 1, D)
    allow = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    allow[0, ..., 2] = True
    allow[1, ..., :6] = True
    mask = allow if mask_kind == "bool" else torch.zeros(allow.shape).masked_fill(~allow, float("-inf"))
    out, mass = ops.kv_attention(q, kc, ks, vc, vs, mask, None, *NO_ROPE,
                                 str(AttentionMeta("int8:per_token", "int8:per_token", D, D, S, 0.2, need_mass=True)))
    v = ops.kv_load(vc, vs, *NO_ROPE, torch.float32, str(CacheRead("int8:per_token", D, S)))
    torch.testing.assert_close(out[0], v[0, :, 2:3].repeat_interleave(2, 0), rtol=1e-5, atol=1e-5)
    assert mass[0, :, 2].allclose(torch.full((HKV,), 2.0)) and mass[0].sum() == pytest.approx(4.0)


class TinyCachedAttention(torch.nn.Module):
    """A module that owns packed caches and uses the ops the graph pass emits."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        layout = CacheLayout.build(spec, (B, HKV, S, D), torch.float32)
        for prefix in ("k", "v"):
            cache, static = layout.allocate()
            for i, t in enumerate(cache):
                self.register_buffer(f"{prefix}_cache_{i}", t)
            for i, t in enumerate(static):
                self.register_buffer(f"{prefix}_static_{i}", t)
        self.n_cache, self.n_static = len(cache), len(static)

    def bufs(self, prefix):
        return ([getattr(self, f"{prefix}_cache_{i}") for i in range(self.n_cache)],
                [getattr(self, f"{prefix}_static_{i}") for i in range(self.n_static)])

    def forward(self, q, k, v, pos):
        kc, ks = self.bufs("k")
        vc, vs = self.bufs("v")
        torch.ops.kvpass.kv_store_(kc, ks, k, pos, self.spec)
        torch.ops.kvpass.kv_store_(vc, vs, v, pos, self.spec)
        out, _ = torch.ops.kvpass.kv_attention(q, kc, ks, vc, vs, None, pos, *NO_ROPE,
                                               str(AttentionMeta(self.spec, self.spec, D, D, S, D**-0.5)))
        dense_v = torch.ops.kvpass.kv_load(vc, vs, *NO_ROPE, torch.float32, str(CacheRead(self.spec, D, S)))
        return out * 2 + dense_v.sum()


def steps():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(B, HQ, t, D, generator=g), torch.randn(B, HKV, t, D, generator=g),
             torch.randn(B, HKV, t, D, generator=g), torch.arange(start, start + t)) for start, t in [(0, 5), (5, 1), (6, 1)]]


@pytest.mark.parametrize("spec", ["int4:per_token:g16", "nuq3:per_token+outliers5%"])
def test_export_and_compile_match_eager(spec):
    eager = TinyCachedAttention(spec)
    expected = [eager(*s) for s in steps()]

    exported = TinyCachedAttention(spec)
    t = torch.export.Dim("t", min=1, max=S)
    ep = torch.export.export(exported, steps()[0], dynamic_shapes=({2: t}, {2: t}, {2: t}, {0: t}), strict=True)
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.kvpass.kv_attention.default in targets
    runner = ep.module()
    for s, e in zip(steps(), expected):
        torch.testing.assert_close(runner(*s), e)
    # state lives in the module's buffers: the cache persisted across the three calls
    assert torch.equal(runner.k_cache_0, eager.k_cache_0)

    compiled_mod = TinyCachedAttention(spec)
    compiled = torch.compile(compiled_mod, backend="inductor", fullgraph=True)
    for s, e in zip(steps(), expected):
        torch.testing.assert_close(compiled(*s), e)
    assert torch.equal(compiled_mod.k_cache_0, eager.k_cache_0)
