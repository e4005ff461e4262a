"""The research methods: KIVI, KVQuant (with calibration) as registered kvpass methods."""

import pytest
import torch
import torch.nn.functional as F
from helpers.generation import prompt
from helpers.tiny_models import build

import kvpass
from kvpass import KVPassError
from kvpass.formats import quantize

CALIB_TOKENS = torch.randint(3, 96, (3000,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama():
    return build("llama")


@pytest.fixture(scope="module")
def calibration(llama):
    return kvpass.calibrate(llama, [CALIB_TOKENS], "kvquant-3bit-1%", n_samples=3, seq_len=64)


def test_methods_are_listed_with_bits():
    listed = kvpass.methods()
    for name in ("kivi-2bit", "kivi-4bit", "kvquant-4bit", "kvquant-3bit-1%", "kvquant-2bit-1%"):
        assert name in listed and "bits/elem" in listed[name]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "gpt2"])
@pytest.mark.parametrize("method", ["kvquant-4bit", "kvquant-2bit-1%", "kivi-4bit"])
def test_method_compiles_generates_and_reports_its_layout(arch, method):
    model = build(arch)
    cal = kvpass.calibrate(model, [CALIB_TOKENS], method, n_samples=2, seq_len=48) if "kvquant" in method else None
    qm = kvpass.compile(model, method, max_cache_len=48, batch_size=2, calibration=cal)
    ids, mask = prompt(2)
    out = qm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert out.shape == (2, 18)
    report = qm.cache_report()
    real = sum(b.numel() * b.element_size() for n, b in qm.graph_module.named_buffers() if n.startswith("kvpass_"))
    assert report.nbytes == real == sum(lay.nbytes for lay in qm.layouts) + sum(report.shared.values())
    for layer in report.layers:  # closed form of each layer's layout, calibrated tensors included
        k, v = qm.layouts[layer.layer].key, qm.layouts[layer.layer].value
        assert layer.nbytes == k.nbytes + v.nbytes


def test_kvquant_keys_are_stored_before_rope_and_sink_is_exact(llama, calibration):
    qm = kvpass.compile(llama, "kvquant-3bit-1%", max_cache_len=48, batch_size=1, calibration=calibration)
    assert all(s.rope is not None for s in qm.sites)
    assert any(n.startswith("kvpass_rope_") for n, _ in qm.graph_module.named_buffers())
    ids, _ = prompt(1)
    qm(ids)
    assert len(calibration.promoted_layers) == 1  # the -1% presets keep one layer in int8
    assert qm.cache_report().layers[calibration.promoted_layers[0]].key_spec == "int8:per_token+outliers1%|sink=1"
    coded = next(i for i in range(2) if i not in calibration.promoted_layers)
    sink = getattr(qm.graph_module, f"kvpass_cache_{coded}_k_sink")  # the first token, pre-RoPE, at model precision
    with torch.no_grad():
        hidden = llama(ids[:, :1], output_hidden_states=True).hidden_states[coded]  # the layer's input
        h = llama.model.layers[coded].input_layernorm(hidden)
        k = llama.model.layers[coded].self_attn.k_proj(h).view(1, 1, 2, 16).transpose(1, 2)
    torch.testing.assert_close(sink, k, rtol=1e-5, atol=1e-5)


def test_calibration_round_trip_and_errors(llama, calibration, tmp_path):
    ids, mask = prompt(2)
    a = kvpass.compile(llama, "kvquant-3bit-1%", max_cache_len=48, batch_size=2, calibration=calibration)
    coded = 1 - calibration.promoted_layers[0]  # the other of the two layers is int8 (no calibrated tensors)
    keys, values = calibration.for_layer(coded, "k"), calibration.for_layer(coded, "v")
    assert keys["lut"].shape == (*keys["lo"].shape, 8)  # keys: one LUT per head and channel
    assert values["lut"].shape == (8,)  # values: one per layer
    calibration.save(tmp_path / "cal")
    b = kvpass.compile(llama, "kvquant-3bit-1%", max_cache_len=48, batch_size=2, calibration=str(tmp_path / "cal"))
    assert torch.equal(a(ids, attention_mask=mask), b(ids, attention_mask=mask))
    again = kvpass.calibrate(llama, [CALIB_TOKENS], "kvquant-3bit-1%", n_samples=3, seq_len=64)
    assert all(torch.equal(again.tensors[k], calibration.tensors[k]) for k in calibration.tensors)  # deterministic
    with pytest.raises(KVPassError, match="made for another model"):
        kvpass.compile(build("qwen2"), "kvquant-3bit-1%", max_cache_len=48, calibration=calibration)
    with pytest.raises(KVPassError, match="is for method 'kvquant-3bit-1%', not 'kvquant-2bit'"):
        kvpass.compile(llama, "kvquant-2bit", max_cache_len=48, calibration=calibration)
    with pytest.raises(KVPassError, match="needs calibration"):
        kvpass.compile(llama, "kvquant-3bit", max_cache_len=48)
    bad = CALIB_TOKENS.float()
    bad[10] = float("nan")
    with pytest.raises(KVPassError, match="NaN"):
        kvpass.calibrate(llama, [bad], "kvquant-3bit", n_samples=1, seq_len=32)
    with pytest.raises(KVPassError, match="fewer than seq_len"):
        kvpass.calibrate(llama, [CALIB_TOKENS[:10]], "kvquant-3bit", n_samples=1, seq_len=32)


def attention_error(k_hat, k, q, v):
    ref = F.scaled_dot_product_attention(q, k, v)
    return float((F.scaled_dot_product_attention(q, k_hat, v) - ref).pow(2).mean() / ref.pow(2).mean())


def test_planted_outlier_channels_per_channel_and_dense_and_sparse_win():
    g = torch.Generator().manual_seed(0)

    def keys(n):
        k = torch.randn(1, 2, n, 64, generator=g)
        k[..., [5, 40]] *= 15.0  # outlier channels, as KVQuant observes in real keys
        return k

    k, calib = keys(256), keys(2048)
    q, v = torch.randn(1, 2, 16, 64, generator=g), torch.randn(1, 2, 256, 64, generator=g)
    lo, hi = calib.amin(2, keepdim=True), calib.amax(2, keepdim=True)
    per_token = attention_error(quantize(k, "int3:per_token").dequantize(), k, q, v)
    per_channel = attention_error(quantize(k, "int3:per_channel:static", lo=lo, hi=hi).dequantize(), k, q, v)
    assert per_channel < 0.5 * per_token
    # rare outlier values on top: dense-and-sparse keeps them and tightens the ranges of everything else
    spiky = k + (torch.rand(k.shape, generator=g) < 0.005) * 30.0
    lo1, hi1 = calib.quantile(0.005, dim=2, keepdim=True), calib.quantile(0.995, dim=2, keepdim=True)
    dense = attention_error(quantize(spiky, "int3:per_channel:static", lo=lo, hi=hi).dequantize(), spiky, q, v)
    sparse = attention_error(quantize(spiky, "int3:per_channel:static+outliers1%", lo=lo1, hi=hi1).dequantize(),
                             spiky, q, v)
    assert sparse < 0.5 * dense


def test_calibration_samples_do_not_chain_autograd_graphs(llama, monkeypatch):
    # the cache writes are in place: a sample must start from cache buffers without the last sample's graph, or
    # every sample's activations stay alive until calibration ends
    import importlib

    module = importlib.import_module("kvpass.calibration.record")
    seen = []
    run = module.Recorder.run

    def checked(self, *args):
        seen.append(sum(b.grad_fn is not None for b in self.module.buffers()))
        return run(self, *args)

    monkeypatch.setattr(module.Recorder, "run", checked)
    kvpass.calibrate(llama, [CALIB_TOKENS], "kvquant-3bit-1%", n_samples=3, seq_len=64)
    assert seen == [0, 0, 0]


def test_calibrated_ranges_and_luts_leave_out_the_sink_tokens():
    from kvpass.calibration.statics import fit_statics
    from kvpass.kvcache import parse_cache_spec

    g = torch.Generator().manual_seed(0)
    act = torch.randn(2, 1, 40, 8, generator=g)
    act[:, :, 0] = 500.0  # the first token's keys, far outside the others (kept at model precision anyway)
    fisher = torch.ones_like(act)
    with_sink = fit_statics(parse_cache_spec("nuq2:per_channel:static:channel_lut|sink=1"), act, fisher, 0)
    assert with_sink["hi"].float().max() < 10
    without = fit_statics(parse_cache_spec("nuq2:per_channel:static:channel_lut"), act, fisher, 0)
    assert without["hi"].float().min() == 500
