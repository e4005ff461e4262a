"""Cache options: the KIVI residual window, the attention sink, and keys stored before RoPE."""

import pytest
import torch
from helpers.generation import prompt, reference
from helpers.tiny_models import build

import kvpass
from kvpass.calibration.store import CalibKey
from kvpass.formats import quantize
from kvpass.kvcache import CacheLayout, parse_cache_spec
from kvpass.methods import MethodConfig, OverlayConfig
from kvpass.ops import cache as ops
from kvpass.ops.meta import AttentionMeta, CacheRead

B, H, S, D, R = 2, 2, 40, 16, 8
NO_ROPE = (None, None)
KIVI_K = f"int2:per_channel:g4|residual={R}"


def fill(spec, chunks, seed=0):
    layout = CacheLayout.build(spec, (B, H, S, D), torch.float32)
    cache, static = layout.allocate()
    x = torch.randn(B, H, sum(chunks), D, generator=torch.Generator().manual_seed(seed))
    start = 0
    for n in chunks:
        ops.kv_store_(cache, static, x[:, :, start:start + n], torch.arange(start, start + n), spec)
        start += n
    return layout, cache, static, x


def test_residual_keeps_recent_tokens_exact_and_codes_complete_blocks_per_channel():
    _, cache, static, x = fill(KIVI_K, [21])
    dense = ops.kv_load(cache, static, *NO_ROPE, torch.float32, str(CacheRead(KIVI_K, D, S)))
    done = 21 // R * R
    expected = quantize(x[:, :, :done].reshape(B, H, done // R, R, D), "int2:per_channel:g4").dequantize()
    torch.testing.assert_close(dense[:, :, :done], expected.reshape(B, H, done, D))
    assert torch.equal(dense[:, :, done:21], x[:, :, done:21])  # the residual window: model precision
    assert (dense[:, :, :done] != x[:, :, :done]).any()


def test_residual_cache_does_not_depend_on_chunking():
    _, a, _, _ = fill(KIVI_K, [21])
    _, b, _, _ = fill(KIVI_K, [1] * 21)
    _, c, _, _ = fill(KIVI_K, [5, 3, 9, 4])
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_residual_bytes_and_opcheck():
    layout, cache, static, x = fill(KIVI_K, [13])
    assert layout.nbytes == sum(t.numel() * t.element_size() for t in cache + static)
    blocks = S // R
    codes, meta, ring = blocks * R * D * 2 // 8, 2 * blocks * (R // 4) * D * 2, R * D * 4
    assert layout.nbytes == B * H * (codes + meta + ring) + 8
    torch.library.opcheck(ops.kv_store_, (cache, static, x[:, :, :1], torch.tensor([13]), KIVI_K))
    torch.library.opcheck(ops.kv_load, (cache, static, *NO_ROPE, torch.float32, str(CacheRead(KIVI_K, D, S))))
    q = torch.randn(B, 2 * H, 1, D)
    torch.library.opcheck(ops.kv_attention, (q, cache, static, cache, static, None, torch.tensor([13]),
                                             *NO_ROPE, str(AttentionMeta(KIVI_K, KIVI_K, D, D, S, 0.25, need_mass=True))))


def test_sink_keeps_the_first_token():
    spec = "int2:per_token|sink=1"
    _, cache, static, x = fill(spec, [6])
    dense = ops.kv_load(cache, static, *NO_ROPE, torch.float32, str(CacheRead(spec, D, S)))
    assert torch.equal(dense[:, :, 0], x[:, :, 0])
    assert not torch.equal(dense[:, :, 1:6], x[:, :, 1:6])
    assert CacheLayout.build(spec, (B, H, S, D), torch.float32).nbytes == (
        CacheLayout.build("int2:per_token", (B, H, S, D), torch.float32).nbytes + B * H * D * 4)


def test_cache_spec_errors():
    with pytest.raises(kvpass.KVPassError, match="residual window"):
        parse_cache_spec("int2:per_channel:g32")
    with pytest.raises(kvpass.KVPassError, match="multiple of the token group"):
        parse_cache_spec("int2:per_channel:g32|residual=48")
    with pytest.raises(kvpass.KVPassError, match="unknown cache option"):
        parse_cache_spec("int2|window=3")


PRE_ROPE_EXACT = MethodConfig("pre-rope-none", "keys stored before RoPE, unquantized", "none", "none",
                              pre_rope_keys=True)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt_neox", "qwen3"])
def test_pre_rope_keys_without_quantization_are_exact(arch):
    model = build(arch)
    ids, mask = prompt(2)
    seq, ref_prefill, _ = reference(model, ids, mask)
    qm = kvpass.compile(model, PRE_ROPE_EXACT, max_cache_len=48, batch_size=2)
    assert all(s.rope is not None for s in qm.sites)
    names = [n for n, _ in qm.graph_module.named_buffers()]
    # cos/sin are recomputed from one int32 position id per cached slot, shared by every layer
    assert [n for n in names if n.startswith("kvpass_rope_")] == ["kvpass_rope_positions_0"]
    assert qm.cache_report().shared == {"kvpass_rope_positions_0": 2 * 48 * 4}
    logits = qm(ids, attention_mask=mask)
    torch.testing.assert_close(logits[mask.bool()], ref_prefill[mask.bool()], rtol=1e-5, atol=1e-5)
    assert torch.equal(qm.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[]), seq)


def test_pre_rope_on_the_plain_decoder_with_interleaved_rope():
    from helpers.plain_decoder import PlainDecoder

    toks = torch.randint(0, 80, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = PlainDecoder()(toks, torch.arange(12))
    qm = kvpass.compile(PlainDecoder(), PRE_ROPE_EXACT, example_inputs=(torch.zeros(1, 2, dtype=torch.long), torch.arange(2)))
    torch.testing.assert_close(qm(toks, torch.arange(12)), expected, rtol=1e-5, atol=1e-5)


def _cos_sin_of_the_sequence():
    from helpers.plain_decoder import PlainDecoder

    class SequenceScaled(PlainDecoder):
        """Angles scaled by the call's own last position: a row depends on the other positions of the call."""

        def forward(self, tokens, positions):
            angles = positions[:, None].float() * self.inv_freq[None, :] * (8.0 / (positions.max() + 8.0))
            cos = angles.cos().repeat_interleave(2, dim=-1)
            sin = angles.sin().repeat_interleave(2, dim=-1)
            mask = torch.arange(self.max_len)[None, :] <= positions[:, None]
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x, positions, cos, sin, mask)
            return self.head(x)

    return SequenceScaled, lambda tokens, positions: (tokens, positions)


def test_pre_rope_caches_cos_sin_rows_where_a_row_depends_on_other_positions():
    cls, inputs = _cos_sin_of_the_sequence()
    toks = torch.randint(0, 80, (1, 12), generator=torch.Generator().manual_seed(0))
    steps = [(toks[:, :8], torch.arange(8)), (toks[:, 8:10], torch.arange(8, 10)), (toks[:, 10:], torch.arange(10, 12))]
    ref = cls()
    with torch.no_grad():
        expected = [ref(*inputs(t, p)) for t, p in steps]
    qm = kvpass.compile(cls(), PRE_ROPE_EXACT, example_inputs=inputs(torch.zeros(1, 2, dtype=torch.long),
                                                                    torch.arange(2)))
    names = [n for n, _ in qm.graph_module.named_buffers() if n.startswith("kvpass_rope_")]
    assert names == ["kvpass_rope_0_cos", "kvpass_rope_0_sin"]
    for (t, p), e in zip(steps, expected):
        torch.testing.assert_close(qm(*inputs(t, p)), e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_kivi_generates_and_reports_its_layout(arch):
    model = build(arch)
    ids, mask = prompt(2, length=20)
    qm = kvpass.compile(model, "kivi-2bit", max_cache_len=300, batch_size=2)
    out = qm.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    assert out.shape == (2, 24)
    report = qm.cache_report()
    assert report.nbytes == sum(b.numel() * b.element_size() for n, b in qm.graph_module.named_buffers()
                                if n.startswith("kvpass_cache_"))
    layout = qm.layouts[0].key
    assert layout.blocks == 2  # 300 tokens: two complete blocks of 128, the rest in the ring
    # below 128 tokens KIVI is exact: everything is still in the residual window
    fp = kvpass.compile(model, "fp16", max_cache_len=300, batch_size=2)
    torch.testing.assert_close(qm(ids, attention_mask=mask) if not qm.reset() else None,
                               fp(ids, attention_mask=mask), rtol=1e-5, atol=1e-5)


def test_residual_load_of_a_prefix_reads_blocks_not_the_ring():
    layout, cache, static, _ = fill(KIVI_K, [30])
    full = ops.kv_load(cache, static, *NO_ROPE, torch.float32, str(CacheRead(KIVI_K, D, S)))
    for upto in (5, 8, 13, 30):
        from kvpass.kvcache import load

        part = load(cache, static, layout.spec, D, S, torch.float32, upto)
        assert torch.equal(part, full[:, :, :upto])


def test_full_precision_layers_keep_their_cache_at_model_precision():
    model = build("llama")
    n = model.config.num_hidden_layers
    ids, mask = prompt(2)
    seq, ref_prefill, _ = reference(model, ids, mask)
    every = MethodConfig("int4-all-kept", "int4 keys before RoPE, every layer kept at model precision",
                         "int4:per_token", "int4:per_token", pre_rope_keys=True, full_precision_layers=tuple(range(n)))
    qm = kvpass.compile(model, every, max_cache_len=48, batch_size=2)
    torch.testing.assert_close(qm(ids, attention_mask=mask)[mask.bool()], ref_prefill[mask.bool()], rtol=1e-5, atol=1e-5)
    assert torch.equal(qm.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[]), seq)

    first = MethodConfig("int4-first-kept", "int4, layer 0 kept", "int4:per_token", "int4:per_token",
                         full_precision_layers=(0,))
    qm = kvpass.compile(model, first, max_cache_len=48, batch_size=2)
    report = qm.cache_report()
    kept, coded = report.layers[0], report.layers[1]
    assert (kept.key_spec, kept.value_spec, coded.key_spec) == ("none", "none", "int4:per_token")
    assert kept.nbytes == kept.dense_nbytes == 2 * 2 * 2 * 48 * D * 4  # K and V, fp32, batch 2, 2 KV heads
    assert coded.nbytes == 2 * CacheLayout.build("int4:per_token", (2, 2, 48, D), torch.float32).nbytes
    qm(ids, attention_mask=mask)
    k0 = qm.graph_module.kvpass_cache_0_k_data
    assert k0.dtype == torch.float32 and (k0 != 0).any()  # the kept layer's cache is written at full precision

    with pytest.raises(kvpass.KVPassError, match="full_precision_layers applies to one key and one value spec"):
        MethodConfig("bad", "", "int4", "int4", full_precision_layers=(0,), overlay=OverlayConfig(0.2))
    with pytest.raises(kvpass.KVPassError, match=r"names layers \[7\] in full_precision_layers, but the model's attention layers are 0-1"):
        kvpass.compile(model, MethodConfig("late", "", "int4", "int4", full_precision_layers=(1, 7)), max_cache_len=48)
    with pytest.raises(kvpass.KVPassError, match="layer indices >= 0"):
        MethodConfig("bad", "", "int4", "int4", full_precision_layers=(-1,))


def test_full_precision_layers_are_not_calibrated():
    model = build("llama")
    m = MethodConfig("kvquant-3bit-layer0-kept", "", "nuq3:per_channel:static:channel_lut+outliers1%|sink=1",
                     "nuq3:per_token+outliers1%|sink=1", pre_rope_keys=True, full_precision_layers=(0,))
    tokens = torch.randint(3, 96, (600,), generator=torch.Generator().manual_seed(0))
    cal = kvpass.calibrate(model, [tokens], m, n_samples=2, seq_len=48)
    assert not any(key.layer == 0 for key in cal.tensors)
    assert {CalibKey(1, "k", "lo"), CalibKey(1, "k", "lut"), CalibKey(1, "v", "lut")} <= set(cal.tensors)
    qm = kvpass.compile(model, m, max_cache_len=48, calibration=cal)
    assert qm.cache_report().layers[0].key_spec == "none"


def offset_tokens(n, seed=0):
    """Tokens whose channels carry a large constant offset per head (as a key projection's bias gives)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, n, D, generator=g) + 8 * torch.randn(1, H, 1, D, generator=g)


@pytest.mark.parametrize("fmt", ["int4:per_token", "lm4:per_token:hadamard", "nuq4:per_token+outliers5%"])
def test_centre_codes_tokens_minus_the_first_writes_mean(fmt):
    x = offset_tokens(30)
    spec = f"{fmt}|centre=8"
    layout = CacheLayout.build(spec, (B, H, S, D), torch.float32)
    cache, static = layout.allocate()
    ops.kv_store_(cache, static, x[:, :, :12], torch.arange(12), spec)
    for p in range(12, 30):  # later writes keep the centre the first one set
        ops.kv_store_(cache, static, x[:, :, p:p + 1], torch.tensor([p]), spec)
    centre = dict(zip(layout.buffer_specs(), cache))["centre"]
    torch.testing.assert_close(centre, x[:, :, :8].mean(2, keepdim=True))
    dense = ops.kv_load(cache, static, *NO_ROPE, torch.float32, str(CacheRead(spec, D, S)))[:, :, :30]
    expected = quantize(x - centre, fmt).dequantize() + centre
    torch.testing.assert_close(dense, expected)
    plain = quantize(x, fmt).dequantize()
    signal = (x - x.mean(2, keepdim=True)).norm()
    assert (dense - x).norm() < 0.3 * (plain - x).norm()  # the offset no longer takes each token's scale
    assert (dense - x).norm() / signal < 0.15
    # the centre is one row per sequence and head at model precision, counted in the bits
    assert layout.nbytes == sum(t.numel() * t.element_size() for t in cache + static)
    assert layout.nbytes - CacheLayout.build(fmt, (B, H, S, D), torch.float32).nbytes == B * H * D * 4 + 8


def test_centre_beside_a_sink_a_window_and_a_residual_ring():
    # the exact rows stay exact; the coded ones come back around the centre; chunking does not change the bytes
    x = offset_tokens(30, seed=1)
    for spec in ("nuq3:per_token|sink=2|recent=4|centre=8", f"{KIVI_K}|centre=8"):
        layout = CacheLayout.build(spec, (B, H, S, D), torch.float32)
        one, static = layout.allocate()
        ops.kv_store_(one, static, x, torch.arange(30), spec)
        dense = ops.kv_load(one, static, *NO_ROPE, torch.float32, str(CacheRead(spec, D, S)))[:, :, :30]
        cs = parse_cache_spec(spec)
        if cs.sink:
            assert torch.equal(dense[:, :, :2], x[:, :, :2])
        else:
            assert torch.equal(dense[:, :, 24:30], x[:, :, 24:30])  # the unfinished block in the ring
        assert (dense - x).norm() / (x - x.mean(2, keepdim=True)).norm() < 0.5
    with pytest.raises(kvpass.KVPassError, match="centre"):
        parse_cache_spec("fp16|centre=8")
