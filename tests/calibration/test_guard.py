"""The quality guard: the calibration windows' perplexity measured after fitting, a preset past its documented bound
warned about, raised on, or given more bits until it holds."""

import math
import warnings
from dataclasses import replace

import pytest
import torch
import transformers as tf
from helpers import qaq as qaq_helpers
from helpers.perplexity import nll
from helpers.tiny_models import _common

import kvpass
from kvpass.calibration.layers import TOKENS, WINDOWS
from kvpass.calibration.record import token_samples
from kvpass.calibration.store import Calibration
from kvpass.methods import MethodConfig

SEQ = 48
COARSE = MethodConfig("guard-int2", "2-bit keys against calibrated ranges, 2-bit values",
                      "int2:per_channel:static|sink=1", "int2:per_token|sink=1", quality_bound=0.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**_common(num_hidden_layers=3, num_key_value_heads=2))).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 96, (600,), generator=torch.Generator().manual_seed(0))


def calibrate_quietly(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kvpass.KVPassWarning)
        return kvpass.calibrate(*args, **kwargs)


@pytest.fixture(scope="module")
def plain(model, tokens):
    return calibrate_quietly(model, [tokens], COARSE, n_samples=2, seq_len=SEQ)


def test_the_check_is_the_calibration_windows_perplexity_change(model, tokens, plain):
    cal = plain
    check = cal.meta["check"]
    windows = [w[:TOKENS] for w in token_samples([tokens], None, 2, SEQ, 0)[:WINDOWS]]
    captured = kvpass.capture_model(model, max_cache_len=SEQ)
    fp = nll(kvpass.compile(captured, "fp16", prefill_chunk=SEQ), windows)
    coded = nll(kvpass.compile(captured, COARSE, prefill_chunk=SEQ, calibration=cal), windows)
    assert check["loss"] == pytest.approx(math.expm1(coded - fp), rel=1e-4, abs=1e-7)
    assert check["loss"] > 0.001  # 2-bit keys and values do cost this random model
    assert check["bound"] == 0.0 and check["tokens"] == 2 * SEQ and check["raised"] == []


def test_past_its_bound_a_preset_warns_naming_the_loss_the_bound_and_the_fix(model, tokens):
    with pytest.warns(kvpass.KVPassWarning, match=r"'guard-int2' raises .* by \+[0-9.]+%.* bound of \+0%.*more-bits"):
        cal = kvpass.calibrate(model, [tokens], COARSE, n_samples=2, seq_len=SEQ)
    assert cal.meta["check"]["loss"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", kvpass.KVPassWarning)  # within its bound: silent
        ok = kvpass.calibrate(model, [tokens], replace(COARSE, quality_bound=10.0), n_samples=2, seq_len=SEQ)
    assert ok.meta["check"]["loss"] <= 10.0


def test_raise_mode_stops_calibration_and_off_skips_the_check(model, tokens):
    with pytest.raises(kvpass.KVPassError, match=r"past its documented bound.*guard='more-bits'"):
        kvpass.calibrate(model, [tokens], COARSE, n_samples=2, seq_len=SEQ, guard="raise")
    cal = kvpass.calibrate(model, [tokens], COARSE, n_samples=2, seq_len=SEQ, guard="off")
    assert "check" not in cal.meta
    with pytest.raises(kvpass.KVPassError, match="guard must be one of"):
        kvpass.calibrate(model, [tokens], COARSE, n_samples=2, seq_len=SEQ, guard="loud")


def test_more_bits_promotes_layers_by_their_loss_until_the_bound_holds(model, tokens, plain, tmp_path):
    # a bound of zero is never met: every layer ends in the sensitive spec, the costliest first
    with pytest.warns(kvpass.KVPassWarning, match=r"even after 3 step\(s\) of more bits \(layer \d in int8"):
        every = kvpass.calibrate(model, [tokens], COARSE, n_samples=2, seq_len=SEQ, guard="more-bits")
    losses = {int(k): v for k, v in every.meta["layer_loss"].items()}
    first = int(every.meta["check"]["raised"][0].split()[1])
    assert first == max(losses, key=losses.get)
    assert every.promoted_layers == (0, 1, 2) and every.meta["guard_promoted"] == 3
    assert every.meta["check"]["loss"] < plain.meta["check"]["loss"]
    # a bound between the two: one promotion meets it, and the checked loss is below the bound
    one = replace(COARSE, quality_bound=(plain.meta["check"]["loss"] + every.meta["check"]["loss"]) / 2)
    cal = calibrate_quietly(model, [tokens], one, n_samples=2, seq_len=SEQ, guard="more-bits")
    assert 1 <= len(cal.promoted_layers) <= 3 and cal.promoted_layers[0:1] != ()
    if cal.meta["check"]["loss"] <= one.quality_bound:
        assert len(cal.meta["check"]["raised"]) == len(cal.promoted_layers)
    # the promoted layers compile, are stored in the sensitive spec, and survive save/load
    cal.save(tmp_path / "c")
    loaded = Calibration.load(tmp_path / "c")
    qm = kvpass.compile(model, one, max_cache_len=SEQ, calibration=loaded)
    specs = {row.layer: row.key_spec for row in qm.cache_report().layers}
    assert all(specs[layer].startswith("int8") for layer in cal.promoted_layers)
    assert all(not specs[layer].startswith("int8") for layer in specs if layer not in cal.promoted_layers)


def test_more_bits_raises_qaq_target_until_the_bound_holds(model):
    coarse = ("int1:per_token", "int2:per_token", "int8:per_token", "fp16")
    method = replace(qaq_helpers.method(target=4.0, tiers=coarse), quality_bound=0.0)
    ids = qaq_helpers.calibration_ids()
    plain = calibrate_quietly(model, ids, method, n_samples=2, seq_len=SEQ)
    assert plain.meta["check"]["loss"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", kvpass.KVPassWarning)  # met after the raise: silent
        more = kvpass.calibrate(model, ids, method, n_samples=2, seq_len=SEQ, guard="more-bits")
    assert more.meta["check"]["raised"] == ["target 4.50 bits/elem"] and more.meta["target_bits"] == 4.5
    assert more.meta["check"]["loss"] <= 0 < plain.meta["check"]["loss"]
    assert more.meta["eps"] < plain.meta["eps"]
    tier = lambda cal: float(sum((cal.tensors[k] * torch.arange(4)).sum() for k in cal.tensors if k.name == "tier_share"))
    assert tier(more) > tier(plain)  # tokens moved to higher tiers
    captured = kvpass.capture_model(model, max_cache_len=SEQ)
    bits = lambda cal: kvpass.compile(captured, method, calibration=cal).cache_report().bits_per_element
    assert bits(more) > bits(plain)


def test_a_qaq_tolerance_finds_the_fewest_bits_that_keep_it(model):
    from kvpass.methods.qaq import QAQConfig

    coarse = ("int1:per_token", "int2:per_token", "int8:per_token", "fp16")
    config = QAQConfig(tolerance=0.0, tiers=coarse, per_layer_eps=True)
    method = MethodConfig("qaq-test-tolerance", "test", "none", "none", max_chunk=8, qaq=config, quality_bound=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kvpass.KVPassWarning)  # the tolerance is met: the guard is silent
        cal = kvpass.calibrate(model, qaq_helpers.calibration_ids(), method, n_samples=2, seq_len=SEQ)
    tried = cal.meta["tolerance_search"]
    chosen = cal.meta["target_bits"]
    assert len(tried) == 7 and tried[0][1] <= 0  # the top, then six bisection steps
    feasible = [t for t, loss in tried if loss <= 0]
    assert chosen == pytest.approx(min(feasible), abs=1e-3)
    # one bisection step below the chosen target the loss was past the tolerance
    step = (tried[0][0] - tried[1][0]) / 2 ** (len(tried) - 2)
    assert any(loss > 0 and chosen - 1.01 * step <= t < chosen for t, loss in tried)
    # the recorded check is the chosen calibration's own loss, measured as the guard measures
    assert cal.meta["check"]["loss"] == {round(t, 4): loss for t, loss in tried}[round(chosen, 4)]
    assert "layer_eps" in cal.meta and len(cal.meta["layer_eps"]) == 3
    captured = kvpass.capture_model(model, max_cache_len=SEQ)
    assert kvpass.compile(captured, method, calibration=cal).cache_report().bits_per_element < 16.5
    assert "bits/elem from calibration" in kvpass.methods()["qaq-1%"]
