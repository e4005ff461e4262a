"""Reliability cases (docs/reliability.md): no silent wrong answers, no partial writes, every bad input a clear
KVPassError. Each test names its case."""

import copy
import dataclasses
import io
import json
import pickle
import warnings

import numpy as np
import pytest
import torch
import transformers
from helpers.plain_decoder import PlainDecoder
from helpers.qaq import calibration_ids as qaq_ids
from helpers.qaq import method as qaq_method
from helpers.tiny_models import VOCAB, build
from kvpass.lowering import cpu_build

import kvpass
from kvpass.calibration.store import CalibKey, Calibration
from kvpass.errors import KVPassError
from kvpass.formats import parse_spec, quantize
from kvpass.methods import MethodConfig, QAQConfig

KVQUANT = MethodConfig("kvquant-3bit-rel", "", "nuq3:per_channel:static:channel_lut+outliers1%|sink=1",
                       "nuq3:per_token+outliers1%|sink=1", pre_rope_keys=True)


def ids(n, seed=0, batch=1):
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def texts(n=600):
    return [ids(n, seed=5)[0]]


@pytest.fixture(scope="module")
def llama():
    return build("llama")


@pytest.fixture(scope="module")
def kvquant_cal(llama):
    return kvpass.calibrate(llama, texts(), KVQUANT, n_samples=2, seq_len=32)


# S1: a chunked or failed call leaves the cache and seen_tokens as they were
@pytest.mark.parametrize("method", ["mikv", "h2o"])
def test_s1_chunked_call_that_cannot_fit_writes_nothing(llama, method):
    q = kvpass.compile(llama, method, max_cache_len=160)
    first, nxt = ids(20), ids(3, seed=2)
    q.step(first)
    with pytest.raises(KVPassError, match=r"20 cached \+ 150 new tokens = 170 > max_cache_len=160"):
        q.step(ids(150, seed=1))
    assert q.seen_tokens == 20
    ref = kvpass.compile(llama, method, max_cache_len=160)
    ref.step(first)
    torch.testing.assert_close(q.step(nxt), ref.step(nxt), rtol=0, atol=0)


def test_s1_out_of_vocabulary_id_deep_in_a_chunked_prompt_writes_nothing(llama):
    q = kvpass.compile(llama, "mikv", max_cache_len=160)
    first, nxt = ids(20), ids(3, seed=2)
    q.step(first)
    bad = ids(100, seed=1)
    bad[0, 90] = VOCAB + 7
    with pytest.raises(KVPassError, match=rf"{VOCAB + 7}, outside the model's vocabulary \[0, {VOCAB}\)"):
        q.step(bad)
    assert q.seen_tokens == 20
    ref = kvpass.compile(llama, "mikv", max_cache_len=160)
    ref.step(first)
    torch.testing.assert_close(q.step(nxt), ref.step(nxt), rtol=0, atol=0)


def test_s1_a_step_failing_mid_way_restores_the_rings_of_the_layers_it_wrote():
    model = build("llama")
    q = kvpass.compile(model, "kivi-2bit", max_cache_len=160)
    q.step(ids(120))
    rings = {r.name: q.graph_module.get_buffer(r.name).clone() for r in q.buffers if r.role.name == "RING"}
    assert any(name.endswith("_residual") for name in rings) and any(name.endswith("_state") for name in rings)
    with torch.no_grad():  # the second layer's values leave fp16 scales' range: its store raises after the first's
        model.model.layers[1].self_attn.v_proj.weight.mul_(1e6)
    with pytest.raises(KVPassError, match="past what the fp16 scales"):
        q.step(ids(12, seed=1))  # crosses the residual block at 128
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight.div_(1e6)
    assert q.seen_tokens == 120
    assert all(torch.equal(q.graph_module.get_buffer(n), t) for n, t in rings.items())


def _state(q):
    return {r.name: q.graph_module.get_buffer(r.name).clone() for r in q.buffers if r.role.per_sequence}


def _fail_a_step(model, q, new):
    """Run a step whose second layer's values leave fp16 scales' range: it raises after the first layer wrote."""
    weight = model.model.layers[1].self_attn.v_proj.weight
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(1e6)
    try:
        with pytest.raises(KVPassError, match="fp16"):
            q.step(new)
    finally:
        with torch.no_grad():
            weight.copy_(kept)


def _qaq(retain):
    m = qaq_method(target=8.0)
    return dataclasses.replace(m, name=f"{m.name}-{retain}", qaq=dataclasses.replace(m.qaq, retain=retain))


@pytest.mark.parametrize("kind", ["mikv", "mikv-reference", "qaq", "qaq-retain"])
def test_s1_a_step_failing_mid_way_puts_overlay_and_tier_state_back(kind, monkeypatch):
    # overlay rows and QAQ tier codes are logged as the ops overwrite them (the retained copy's promotions rewrite
    # decided entries); the map, scores and rings are cloned: every byte is as before and the sequence goes on
    native_off(monkeypatch, kind == "mikv-reference")
    try:
        _failing_step_is_undone(kind)
    finally:
        native_off(monkeypatch, False)


def native_off(monkeypatch, off: bool) -> None:
    monkeypatch.setenv("KVPASS_CPU_KERNELS", "0" if off else "1")
    cpu_build.load.cache_clear()
    cpu_build.available.cache_clear()


def _failing_step_is_undone(kind: str) -> None:
    model = build("llama")
    if kind.startswith("qaq"):
        m = _qaq(kind == "qaq-retain")
        q = kvpass.compile(model, m, max_cache_len=96,
                           calibration=kvpass.calibrate(model, qaq_ids(), m, n_samples=2, seq_len=96))
    else:
        q = kvpass.compile(model, "mikv", max_cache_len=96)
    first, failing, nxt = ids(40), ids(20, seed=1), ids(3, seed=2)
    ref = copy.deepcopy(q)
    q.step(first)
    ref.step(first)
    before = _state(q)
    _fail_a_step(model, q, failing)
    assert q.seen_tokens == 40
    after, roles = _state(q), {r.name: r.role.name for r in q.buffers}
    # the codes written at the failed step's slots lie past the cached tokens, where nothing reads them
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert {roles[n] for n in changed} <= {"STATE"}
    # (what there was to put back: the same step run through writes layer 0's entries)
    through = copy.deepcopy(ref)
    through.step(failing)
    wrote = {n for n, t in _state(through).items() if not torch.equal(t, before[n]) and "cache_0_" in n}
    assert {roles[n] for n in wrote} >= {"ENTRY", "JOURNALED"}
    assert all(torch.equal(before[n][:, :, :40], after[n][:, :, :40]) for n in changed)
    torch.testing.assert_close(q.step(nxt), ref.step(nxt), rtol=0, atol=0)


def test_s1_a_first_step_failing_mid_way_leaves_an_empty_cache():
    model = build("llama")
    q = kvpass.compile(model, "mikv", max_cache_len=64)
    _fail_a_step(model, q, ids(10))
    assert q.seen_tokens == 0
    assert all(not t.any() for t in _state(q).values())
    ref = kvpass.compile(model, "mikv", max_cache_len=64)
    torch.testing.assert_close(q.generate(ids(6), max_new_tokens=3), ref.generate(ids(6), max_new_tokens=3))


# S2: keys or values past fp16's range in an fp32 model: a clear error, and scale_fp32 keeps them finite
def test_s2_values_beyond_fp16_scales_are_an_error_and_scale_fp32_serves():
    model = build("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.mul_(3e5)
    q = kvpass.compile(model, "int8", max_cache_len=32)
    with pytest.raises(KVPassError, match=r"past what the fp16 scales of 'int8:per_token' can hold.*:scale_fp32"):
        q.step(ids(6))
    assert q.seen_tokens == 0
    wide = MethodConfig("int8-wide", "", "int8:per_token:scale_fp32", "int8:per_token:scale_fp32")
    logits = kvpass.compile(model, wide, max_cache_len=32).step(ids(6))
    assert torch.isfinite(logits).all()
    tiers = MethodConfig("qaq-wide-test", "", "none", "none", max_chunk=8,
                         qaq=QAQConfig(eps=1.0, tiers=("int4:per_token", "none"), window=3))
    cal = kvpass.calibrate(build("llama"), texts(), tiers, n_samples=1, seq_len=32)
    q = kvpass.compile(model, tiers, max_cache_len=32, calibration=Calibration(tiers.name, cal.model_hash,
                                                                               cal.tensors, cal.meta))
    with pytest.raises(KVPassError, match="past what the fp16 scales of 'int4:per_token'"):
        q.step(ids(6))


# S3 / U3: calibrations that are damaged, foreign or hold NaN
def test_s3_a_calibration_with_nan_is_refused_at_compile_and_at_load(llama, kvquant_cal, tmp_path):
    bad = Calibration(kvquant_cal.method, kvquant_cal.model_hash, dict(kvquant_cal.tensors), dict(kvquant_cal.meta))
    key = CalibKey(1, "k", "lut")
    bad.tensors[key] = bad.tensors[key].clone().fill_(float("nan"))
    with pytest.raises(KVPassError, match=r"calibration tensor 1.k.lut holds NaN or inf"):
        kvpass.compile(llama, KVQUANT, max_cache_len=32, calibration=bad)
    bad.save(tmp_path / "bad")
    with pytest.raises(KVPassError, match="holds NaN"):
        Calibration.load(tmp_path / "bad")


def test_u3_damaged_calibration_files(kvquant_cal, tmp_path):
    kvquant_cal.save(tmp_path / "cal")
    data = (tmp_path / "cal.safetensors").read_bytes()
    (tmp_path / "cal.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(KVPassError, match="cannot be read.*damaged"):
        Calibration.load(tmp_path / "cal")
    (tmp_path / "cal.json").write_text("{not json")
    with pytest.raises(KVPassError, match="is not a kvpass calibration"):
        Calibration.load(tmp_path / "cal")
    (tmp_path / "cal.json").write_text(json.dumps({"method": "x"}))
    with pytest.raises(KVPassError, match="is not a kvpass calibration.*model_hash"):
        Calibration.load(tmp_path / "cal")


def test_u3_wrong_shaped_or_missing_calibrated_tensors(llama, kvquant_cal):
    wrong = Calibration(kvquant_cal.method, kvquant_cal.model_hash, dict(kvquant_cal.tensors), dict(kvquant_cal.meta))
    wrong.tensors[CalibKey(0, "k", "lo")] = torch.zeros(1, 1, 1, 3)
    with pytest.raises(KVPassError, match=r"layer 0 keys: calibrated tensor 'lo' .* has shape \(1, 1, 1, 3\)"):
        kvpass.compile(llama, KVQUANT, max_cache_len=32, calibration=wrong)
    missing = Calibration(kvquant_cal.method, kvquant_cal.model_hash,
                          {k: v for k, v in kvquant_cal.tensors.items() if k.layer != 1}, dict(kvquant_cal.meta))
    with pytest.raises(KVPassError, match="layer 1 keys: .*calibrated per-channel ranges, and none were given"):
        kvpass.compile(llama, KVQUANT, max_cache_len=32, calibration=missing)


def test_u3_calibration_paths_texts_and_arguments(llama, tmp_path):
    with pytest.raises(KVPassError, match="no calibration at .*missing/cal"):
        kvpass.compile(llama, KVQUANT, max_cache_len=32, calibration=str(tmp_path / "missing" / "cal"))
    with pytest.raises(KVPassError, match="no tokenizer was given"):  # a long text is text, not a file name
        kvpass.compile(llama, KVQUANT, max_cache_len=32, calibration="word " * 100)
    with pytest.raises(KVPassError, match="no calibration texts given"):
        kvpass.calibrate(llama, [], KVQUANT)
    with pytest.raises(KVPassError, match="n_samples must be an int >= 1, got 0"):
        kvpass.calibrate(llama, texts(), KVQUANT, n_samples=0, seq_len=32)
    with pytest.raises(KVPassError, match="seq_len must be an int >= 2, got 1"):
        kvpass.calibrate(llama, texts(), KVQUANT, n_samples=1, seq_len=1)
    with pytest.raises(KVPassError, match=r"outside the model's vocabulary \[0, 96\)"):
        kvpass.calibrate(llama, [torch.arange(500) + 50], KVQUANT, n_samples=1, seq_len=32)


def test_u3_qaq_target_out_of_range_offers_a_target(llama):
    m = kvpass.get_method("qaq-6x")
    with pytest.raises(KVPassError, match=rf"window of {m.qaq.window} tokens; .*seq_len > {m.qaq.window}"):
        kvpass.calibrate(llama, texts(), m, n_samples=1, seq_len=m.qaq.window)
    with pytest.raises(KVPassError, match=r"target_bits=\d+\.\d\d\)\), or other tiers"):
        kvpass.calibrate(llama, texts(), m, n_samples=1, seq_len=128)


# S5: fp8 keeps tiny tensors; int formats say why they cannot
def test_s5_tiny_tensors_fp8_codes_them_and_int_says_why_not():
    x = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(0)) * 1e-6
    for spec in ("fp8_e4m3", "fp8_e4m3:per_token"):
        err = (quantize(x, spec).dequantize() - x).norm() / x.norm()
        assert err < 0.05
    with pytest.raises(kvpass.KVPassError, match="too small for fp16 scales.*':scale_fp32'"):
        quantize(x, "int8:per_token")
    wide = quantize(x, "int8:per_token:scale_fp32")
    assert (wide.dequantize() - x).norm() / x.norm() < 0.01


# S6 / U2: token ids
def test_s6_u2_token_ids_are_checked_and_lists_and_arrays_are_taken(llama):
    q = kvpass.compile(llama, "int4", max_cache_len=32)
    prompt = ids(5)
    ref = q.generate(prompt, max_new_tokens=3)
    with pytest.raises(KVPassError, match="integer token ids, got torch.float32"):
        q.generate(prompt.float() + 0.7, max_new_tokens=3)
    assert torch.equal(q.generate(prompt.tolist(), max_new_tokens=3), ref)
    assert torch.equal(q.generate(np.asarray(prompt), max_new_tokens=3), ref)
    with pytest.raises(KVPassError, match=r"for one sequence pass ids\[None\]"):
        q.generate(prompt[0], max_new_tokens=3)
    with pytest.raises(KVPassError, match="input_ids is empty"):
        q.generate(torch.zeros(1, 0, dtype=torch.long))
    seen = q.seen_tokens
    with pytest.raises(KVPassError, match=r"-1, outside the model's vocabulary"):
        q.step(torch.tensor([[4, -1]]))
    assert q.seen_tokens == seen
    with pytest.raises(KVPassError, match="max_new_tokens must be >= 1"):
        q.generate(prompt, max_new_tokens=0)


def test_right_padding_warns(llama):
    q = kvpass.compile(llama, "int4", max_cache_len=32, batch_size=2)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, -2:] = 0
    with pytest.warns(UserWarning, match="right padding detected"):
        q.generate(ids(6, batch=2), attention_mask=mask, max_new_tokens=2)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q.generate(ids(6, batch=2), attention_mask=mask, max_new_tokens=2)


# S8: a captured program's sizes are fixed
def test_s8_sizes_that_differ_from_the_capture_are_an_error(llama):
    captured = kvpass.capture_model(llama, max_cache_len=64)
    with pytest.raises(KVPassError, match=r"exported with max_cache_len=64, batch_size=1; .*capture again"):
        kvpass.compile(captured, "int4", max_cache_len=4096, batch_size=8)
    assert kvpass.compile(captured, "int4", max_cache_len=64, batch_size=1).max_cache_len == 64


# spec grammar and fixed costs
def test_conflicting_spec_options_are_an_error():
    for text, clash in (("int4:g64:g32", "'g64' and 'g32' both set the group"),
                        ("int4:per_token:per_channel", "'per_token' and 'per_channel' both set the granularity"),
                        ("int4:static:static", "'static' is given twice"),
                        ("int2+outliers1%+outliers2%", "outliers are given 2 times")):
        with pytest.raises(kvpass.KVPassError, match=clash):
            parse_spec(text)


def test_a_cache_larger_than_full_precision_is_said(llama):
    with pytest.warns(UserWarning, match="takes more bytes than the full-precision cache"):
        kvpass.compile(llama, "kivi-2bit", max_cache_len=64)


# U1: capture
def test_u1_capture_errors(monkeypatch):
    model = build("llama")
    with pytest.raises(KVPassError, match="max_cache_len must be an int, got 2.5"):
        kvpass.compile(model, "int4", max_cache_len=2.5)
    gpt2 = build("gpt2")
    with pytest.raises(KVPassError, match=r"learned position embeddings for 512 positions .*max_cache_len <= 512"):
        kvpass.compile(gpt2, "int4", max_cache_len=600)
    with torch.device("meta"):
        on_meta = build("llama")
    with pytest.raises(KVPassError, match="weights on the meta device"):
        kvpass.compile(on_meta, "int4", max_cache_len=32)

    falcon = transformers.FalconForCausalLM(transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32,
                                                                      num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(KVPassError, match="could not trace one step of FalconForCausalLM"):
        kvpass.compile(falcon, "int4", max_cache_len=32)

    def refuse(*args, **kwargs):
        raise RuntimeError("Dynamo does not know this attention\nlong trace")

    monkeypatch.setattr(torch.export, "export", refuse)
    with pytest.raises(KVPassError, match="could not trace one step of LlamaForCausalLM.*Dynamo does not know this "
                                          "attention\\).*decoder-only"):
        kvpass.compile(model, "int4", max_cache_len=32)


# U4: the module path
def test_u4_module_path_errors():
    with pytest.raises(KVPassError, match="T >= 2"):
        kvpass.compile(PlainDecoder(), "int4", example_inputs=(torch.zeros(1, 1, dtype=torch.long), torch.arange(1)))
    q = kvpass.compile(PlainDecoder(), "int4", example_inputs=(torch.zeros(1, 2, dtype=torch.long), torch.arange(2)))
    with pytest.raises(KVPassError, match="allocate longer cache buffers in the module") as err:
        q.generate(torch.zeros(1, q.max_cache_len, dtype=torch.long), max_new_tokens=2)
    assert "kvpass.compile(..., max_cache_len" not in str(err.value)


# C2: copies and pickles
def test_c2_deepcopy_is_independent_and_pickle_says_what_to_do(llama):
    q = kvpass.compile(llama, "int4", max_cache_len=32)
    q.step(ids(5))
    twin = copy.deepcopy(q)
    nxt = ids(2, seed=3)
    torch.testing.assert_close(twin.step(nxt), q.step(nxt), rtol=0, atol=0)
    twin.step(ids(2, seed=4))
    assert (twin.seen_tokens, q.seen_tokens) == (9, 7)
    for dump in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):
        with pytest.raises(KVPassError, match=r"cannot be pickled.*compile again.*copy.deepcopy"):
            dump(q)
