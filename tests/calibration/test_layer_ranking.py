"""Sensitive layers: chosen by calibration loss, stored in the sensitive spec, counted and saved honestly."""

from dataclasses import replace

import pytest
import torch
import transformers as tf
from helpers.perplexity import nll
from helpers.tiny_models import _common

import kvpass
from kvpass.calibration.layers import most_sensitive
from kvpass.calibration.store import Calibration
from kvpass.kvcache import CacheLayout
from kvpass.methods import MethodConfig, OverlayConfig

KEYS, VALUES = "nuq2:per_channel:static:channel_lut|sink=1", "int2:per_token|sink=1"
METHOD = MethodConfig("kv2-sensitive", "2-bit, the most sensitive layer in int8", KEYS, VALUES, pre_rope_keys=True,
                      sensitive_layers=1)
SEQ = 48
INT8 = "int8:per_token+outliers1%|sink=1"


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**_common(num_hidden_layers=4, num_key_value_heads=2))).eval()
    tokens = torch.randint(3, 96, (600,), generator=torch.Generator().manual_seed(0))
    cal = kvpass.calibrate(model, [tokens], METHOD, n_samples=2, seq_len=SEQ)
    return model, tokens, cal, kvpass.capture_model(model, max_cache_len=SEQ)


def test_the_layer_with_the_largest_calibration_loss_is_promoted(setup):
    model, tokens, cal, captured = setup
    losses = {int(k): v for k, v in cal.meta["layer_loss"].items()}
    assert sorted(losses) == [0, 1, 2, 3]
    chosen = max(losses, key=losses.get)
    assert cal.promoted_layers == (chosen,)
    # the recorded loss is the perplexity change of that layer alone coded, on the first calibration samples
    from kvpass.calibration.record import token_samples

    windows = token_samples([tokens], None, 2, SEQ, 0)
    fp = nll(kvpass.compile(captured, "fp16", prefill_chunk=SEQ), windows)
    probe = Calibration(cal.method, cal.model_hash, kvpass.calibrate(
        model, [tokens], replace(METHOD, sensitive_layers=0), n_samples=2, seq_len=SEQ).tensors)
    for layer in (chosen, (chosen + 1) % 4):
        alone = replace(METHOD, sensitive_layers=0, full_precision_layers=tuple(i for i in range(4) if i != layer))
        got = nll(kvpass.compile(captured, alone, prefill_chunk=SEQ, calibration=probe), windows)
        assert losses[layer] == pytest.approx(float(torch.tensor(got - fp).exp() - 1), abs=1e-6)


def test_promoted_layer_is_stored_in_the_sensitive_spec_and_counted(setup):
    _, _, cal, captured = setup
    (chosen,) = cal.promoted_layers
    assert not any(k.layer == chosen for k in cal.tensors)  # int8 per token: nothing calibrated
    assert all("lut" in cal.for_layer(i, "k") for i in range(4) if i != chosen)
    qm = kvpass.compile(captured, METHOD, calibration=cal)
    report = qm.cache_report()
    for i, layer in enumerate(report.layers):
        spec = (INT8, INT8) if i == chosen else (KEYS, VALUES)
        assert (layer.key_spec, layer.value_spec) == spec
        assert layer.nbytes == sum(CacheLayout.build(s, (1, 2, SEQ, 16), torch.float32).nbytes for s in spec)
    # with that layer promoted by hand (no ranking), the same cache and the same logits
    manual = replace(METHOD, sensitive_layers=0, promoted_layers=(chosen,))
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(1))
    by_hand = kvpass.compile(captured, manual, calibration=Calibration(
        manual.name, cal.model_hash, cal.tensors))
    torch.testing.assert_close(qm(ids), by_hand(ids), rtol=0, atol=0)


def test_sensitive_layers_survive_save_and_load(setup, tmp_path):
    _, _, cal, captured = setup
    cal.save(tmp_path / "cal")
    loaded = Calibration.load(tmp_path / "cal")
    assert loaded.promoted_layers == cal.promoted_layers
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(2))
    a = kvpass.compile(captured, METHOD, calibration=cal)(ids)
    b = kvpass.compile(captured, METHOD, calibration=loaded)(ids)
    assert torch.equal(a, b)


def test_sensitive_layer_errors(setup):
    model, tokens, cal, captured = setup
    with pytest.raises(kvpass.KVPassError, match="chose 1 sensitive layers, method 'kv2-sensitive' keeps 2"):
        kvpass.compile(captured, replace(METHOD, sensitive_layers=2), calibration=cal)
    with pytest.raises(kvpass.KVPassError, match="needs calibration"):
        kvpass.compile(captured, MethodConfig("s", "", "int4", "int4", sensitive_layers=1))
    with pytest.raises(kvpass.KVPassError, match=r"keeps 5 sensitive layers in int8:per_token\+outliers1%\|sink=1, but "
                       "the model has 4"):
        kvpass.calibrate(model, [tokens], replace(METHOD, sensitive_layers=5), n_samples=1, seq_len=SEQ)
    with pytest.raises(kvpass.KVPassError, match="sensitive_layers applies to one key and one value spec"):
        MethodConfig("bad", "", "int4", "int4", sensitive_layers=1, overlay=OverlayConfig(0.2))
    with pytest.raises(kvpass.KVPassError, match="sensitive_layers must be >= 0"):
        MethodConfig("bad", "", "int4", "int4", sensitive_layers=-1)
    with pytest.raises(kvpass.KVPassError, match=r"names layers \[9\] in promoted_layers"):
        kvpass.compile(captured, MethodConfig("late", "", "int4", "int4", promoted_layers=(9,)))


def test_most_sensitive_breaks_ties_by_layer_and_returns_layer_order():
    assert most_sensitive({0: 0.1, 1: 0.3, 2: 0.3, 3: -0.2}, 2) == (1, 2)
    assert most_sensitive({0: 0.1, 1: 0.3, 2: 0.3, 3: -0.2}, 3) == (0, 1, 2)
    assert most_sensitive({0: 0.0, 1: 0.0}, 1) == (0,)
    assert most_sensitive({0: 0.5, 1: float("nan"), 2: 0.1}, 1) == (1,)
