"""The TurboQuant-style presets (tq-*): no calibration, bytes counted, rotated codes in the cache, generate with GQA
and padding."""

import pytest
import torch
from helpers.generation import prompt
from helpers.tiny_models import build

import kvpass
from kvpass.formats import rotation
from kvpass.formats.lloyd_max import gaussian_mse

BITS = {"tq-k8v4": (8, 4), "tq-4bit": (4, 4), "tq-k3v4": (3, 4), "tq-3bit": (3, 3), "tq-2bit": (2, 2)}


@pytest.fixture(scope="module")
def captured():
    return kvpass.capture_model(build("llama"), max_cache_len=64, batch_size=2)  # head_dim 16: a scale is 1 bit/elem


@pytest.mark.parametrize("name", [*sorted(BITS), "tq-4bit-1%"])
def test_presets_need_no_calibration_and_count_every_scale(name, captured):
    assert not kvpass.get_method(name).uses_calibration
    qm = kvpass.compile(captured, name)
    kb, vb = BITS.get(name, (4, 4))
    d = qm.sites[0].head_dim
    outlier = 0 if name in BITS else (16 + 8) / d / 2  # one fp16 value and its uint8 index per key vector
    assert qm.cache_report().bits_per_element == pytest.approx((kb + vb) / 2 + 16 / d + outlier)
    if name in ("tq-3bit", "tq-4bit-1%"):
        ids, mask = prompt(2)
        out = qm.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
        assert out.shape == (2, ids.shape[1] + 4)


def test_the_cache_holds_rotated_lloyd_max_codes_of_the_keys():
    model = build("llama")
    qm = kvpass.compile(model, "tq-4bit", max_cache_len=64)
    ids, _ = prompt(1, length=40)
    qm(ids)
    fp = kvpass.compile(model, "fp16", max_cache_len=64)
    fp(ids)
    keys = fp.graph_module.kvpass_cache_0_k_data[:, :, :40].float()
    stored = kvpass.kvcache.load([qm.graph_module.get_buffer(f"kvpass_cache_0_k_{n}") for n in ("codes", "scale")], [],
                                 qm.layouts[0].key.spec, keys.shape[-1], 64, torch.float32)[:, :, :40]
    rel = ((stored - keys).square().sum() / keys.square().sum()).item()
    assert 0 < rel < 1.5 * gaussian_mse(4)
    # the codes themselves are of the rotated keys: decoding without the inverse rotation does not give the keys
    raw = rotation.rotate(stored)
    assert ((raw - keys).square().sum() / keys.square().sum()).item() > 0.5


@pytest.mark.parametrize(("plain", "centred"), [("int4", "int4-c"), ("tq-4bit", "tq-4bit-c")])
def test_centred_presets_take_a_key_bias_out_of_the_codes(plain, centred):
    # a key projection's bias (Qwen2's) is one offset for every token before RoPE: stored before RoPE and minus the
    # prompt's mean, the codes spend no levels on it
    model = build("qwen2")
    with torch.no_grad():
        for layer in model.model.layers:
            bias = layer.self_attn.k_proj.bias
            bias.copy_(10 * torch.randn(bias.shape, generator=torch.Generator().manual_seed(3)))  # >> the keys' spread
    ids, _ = prompt(1, length=24)
    ref = kvpass.compile(model, "fp16", max_cache_len=64).step(ids)
    err = {}
    for name in (plain, centred):
        qm = kvpass.compile(model, name, max_cache_len=64)
        err[name] = float((qm.step(ids) - ref).abs().mean())
    assert err[centred] < 0.5 * err[plain]
    assert not kvpass.get_method(centred).uses_calibration
    report = kvpass.compile(model, centred, max_cache_len=64).cache_report()
    assert report.bits_per_element < kvpass.compile(model, plain, max_cache_len=64).cache_report().bits_per_element + 1.0
