"""Data flows one way: plan reads the calibration (the preset stays as given), rewrite works on its own copies of
the sites locate found, buffers carry typed roles, calibration tensors have structured keys."""

import pytest
import torch
from helpers.tiny_models import build

import kvpass
from kvpass.calibration.store import CalibKey, Calibration
from kvpass.methods import MethodConfig
from kvpass.pipeline.buffers import Role
from kvpass.pipeline.capture import capture_model
from kvpass.pipeline.locate import locate
from kvpass.pipeline.plan import plan
from kvpass.pipeline.rewrite import rewrite

KVQUANT = MethodConfig("kvquant-3bit-test", "", "nuq3:per_channel:static:channel_lut+outliers1%|sink=1",
                       "nuq3:per_token+outliers1%|sink=1", pre_rope_keys=True, balance=True)


def tokens(n=600, seed=0):
    return torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(seed))


def test_rewrite_leaves_the_sites_locate_found_as_they_were():
    captured = capture_model(build("llama"), max_cache_len=32)
    gm = captured.instantiate()
    sites = locate(gm, captured.name)
    before = [(s.query, s.key.new, s.key.positions, s.value.new, s.value.positions, list(s.replaced)) for s in sites]
    method = MethodConfig("int4-balanced-pre-rope", "", "int4", "int4", pre_rope_keys=True, balance=True)
    records = rewrite(gm, sites, plan(sites, method), method)
    # the balancer rescales the query and the stored keys, keys are stored before RoPE: all on the rewrite's copies
    assert [(s.query, s.key.new, s.key.positions, s.value.new, s.value.positions, list(s.replaced))
            for s in sites] == before
    assert {r.name for r in records} == {n for n, _ in gm.named_buffers() if n.startswith("kvpass_")}


def test_plan_reads_the_sensitive_layers_from_the_calibration_and_the_preset_stays():
    model = build("llama")
    method = MethodConfig("int4-one-sensitive", "", "int4:per_token", "int4:per_token", sensitive_layers=1,
                          sensitive_spec="int8:per_token")
    cal = Calibration(method.name, kvpass.calibration.store.config_hash(model), {}, {"promoted_layers": [1]})
    qm = kvpass.compile(model, method, max_cache_len=32, calibration=cal)
    assert qm.method is method and method.promoted_layers == ()
    assert [layer.key_spec for layer in qm.cache_report().layers] == ["int4:per_token", "int8:per_token"]


def test_reset_zeroes_the_state_and_keeps_what_was_calibrated():
    model = build("llama")
    cal = kvpass.calibrate(model, [tokens()], KVQUANT, n_samples=2, seq_len=32)
    qm = kvpass.compile(model, KVQUANT, max_cache_len=32, calibration=cal)
    qm.generate(torch.randint(3, 96, (1, 6)), max_new_tokens=4)
    roles = {r.role for r in qm.buffers}
    assert roles == {Role.STATE, Role.FIXED}
    state = [r for r in qm.buffers if r.role is Role.STATE]
    assert any(bool(qm.graph_module.get_buffer(r.name).ne(0).any()) for r in state)
    qm.reset()
    assert all(not qm.graph_module.get_buffer(r.name).ne(0).any() for r in state)
    for r in (r for r in qm.buffers if r.role is Role.FIXED):  # kvpass_cache_{layer}_{k|v}_static_{name}
        buf = qm.graph_module.get_buffer(r.name)
        prefix, name = r.name.split("_static_")
        assert torch.equal(buf, cal.for_layer(r.layer, prefix[-1])[name].to(buf.dtype).reshape(buf.shape))


def test_calibration_keys_are_structured_and_saved_as_text(tmp_path):
    key = CalibKey.parse("12.v.t0_lut")
    assert key == CalibKey(12, "v", "t0_lut") and str(key) == "12.v.t0_lut"
    with pytest.raises(kvpass.KVPassError, match="is not '<layer>.<k|v>.<name>'"):
        CalibKey.parse("12.q.lut")
    cal = Calibration("m", "h", {"0.k.lo": torch.zeros(2), CalibKey(1, "v", "lut"): torch.ones(8)})
    assert set(cal.tensors) == {CalibKey(0, "k", "lo"), CalibKey(1, "v", "lut")}
    cal.save(tmp_path / "cal")
    loaded = Calibration.load(tmp_path / "cal")
    assert set(loaded.tensors) == set(cal.tensors) and torch.equal(loaded.for_layer(1, "v")["lut"], torch.ones(8))
