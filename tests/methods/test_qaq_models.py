"""QAQ end to end on tiny models: calibrate, compile, generate and account bytes."""

import dataclasses

import pytest
import torch
from helpers.generation import prompt
from helpers.qaq import D, calibration_ids, method
from helpers.tiny_models import build

import kvpass
from kvpass.calibration.record import record, token_samples
from kvpass.calibration.store import CalibKey
from kvpass.errors import KVPassError
from kvpass.formats.nuq import normal_float_grid
from kvpass.kvcache import CacheLayout
from kvpass.methods import MethodConfig, get_method, qaq
from kvpass.methods.qaq import QAQConfig


def test_knob_moves_average_bits_monotonically():
    model = build("llama")
    captured = kvpass.capture_model(model, max_cache_len=128)
    bits, eps = [], []
    for target in (7.0, 10.0, 13.0):
        m = method(target=target)
        cal = kvpass.calibrate(model, calibration_ids(), m, n_samples=2, seq_len=128)
        qm = kvpass.compile(captured, m, calibration=cal)
        report = qm.cache_report()
        bits.append(report.bits_per_element)
        eps.append(cal.meta["eps"])
        assert not any(key.name == "eps" for key in cal.tensors)  # a number in the meta, not a tensor per layer
        # the window ring (fp16, the highest tier's precision), its scores and the query statistics do not scale with
        # the cache (0.6 bits/elem here at 128 tokens, head_dim 16); the tiers and their map land near the target
        window = sum(8 * (4 * 2 * D * 2 + 4 * 4 + 3 * 4) * 2 for _ in qm.layouts)  # 2 heads per layer
        elements = sum(layer.elements for layer in report.layers)
        assert abs(bits[-1] - window / elements - target) < 0.3
    assert bits == sorted(bits) and eps == sorted(eps, reverse=True)


def test_target_context_counts_the_window_and_calibrated_tensors_and_the_ring_takes_the_top_tiers_precision():
    model = build("llama")
    config = QAQConfig(target_bits=9.0, target_context=128)
    m = MethodConfig("qaq-test-context", "QAQ test preset", "none", "none", max_chunk=8, qaq=config)
    cal = kvpass.calibrate(model, calibration_ids(), m, n_samples=2, seq_len=128)
    qm = kvpass.compile(model, m, max_cache_len=128, calibration=cal)
    # everything included (the ring is 0.6 bits/elem of it here), the cache lands near the target at that length
    assert abs(qm.cache_report().bits_per_element - 9.0) < 0.3
    assert abs(m.nominal_bits(head_dim=D, tokens=128) - 9.0) < 1e-9 and m.nominal_bits(head_dim=D, tokens=1024) < 8.6
    plain = method(target=9.0)
    assert cal.meta["eps"] > kvpass.calibrate(model, calibration_ids(), plain, n_samples=2, seq_len=128).meta["eps"]
    assert qm.graph_module.kvpass_cache_0_qaq_k_ring.dtype == torch.float16  # the highest tier is fp16
    exact = kvpass.compile(model, method(eps=1.0, tiers=("int4:per_token", "none")), max_cache_len=32,
                           calibration=kvpass.calibrate(model, calibration_ids(), method(eps=1.0, tiers=(
                               "int4:per_token", "none")), n_samples=1, seq_len=64))
    assert exact.graph_module.kvpass_cache_0_qaq_k_ring.dtype == torch.float32  # the model's, as that tier
    mixed = QAQConfig(eps=1.0, tiers=("int4:per_token", "fp16"), key_tiers=("int4:per_token", "none"))
    rings = [qaq.TierLayout(mixed, (4, 4), 1, 1, 8, D, torch.float32, keys=k).allocate("cpu")["ring"] for k in (1, 0)]
    assert [r.dtype for r in rings] == [torch.float32, torch.float16]  # each side by its own highest tier
    with pytest.raises(KVPassError, match="target_context"):
        QAQConfig(eps=1.0, target_context=128)
    # a window in fp8 costs one byte an element of its ring instead of the top tier's two
    fp8 = dataclasses.replace(config, window_dtype="fp8_e4m3")
    for which in "kv":
        saved = qaq.fixed_nbytes(config, D, which, torch.float32) - qaq.fixed_nbytes(fp8, D, which, torch.float32)
        assert saved == config.ring * D
        # int8: a byte an element and the fp16 scale of each token
        int8 = dataclasses.replace(config, window_dtype="int8")
        assert qaq.fixed_nbytes(int8, D, which, torch.float32) - qaq.fixed_nbytes(fp8, D, which, torch.float32) == (
            config.ring * 2)
    with pytest.raises(KVPassError, match="window_dtype must be one of"):
        QAQConfig(eps=1.0, window_dtype="int4")
    # the sink's entries in the top tier are fixed bytes too; so is what the cache holds once for every layer
    no_sink = dataclasses.replace(config, sink=0)
    assert qaq.fixed_nbytes(config, D, "v", torch.float32) - qaq.fixed_nbytes(no_sink, D, "v", torch.float32) == 2 * D
    g = torch.Generator().manual_seed(0)
    nk, nv = [torch.rand(2, 500, generator=g)], [torch.rand(2, 500, generator=g)]
    lower = dataclasses.replace(config, target_bits=config.target_bits - 0.25)
    assert qaq.solve(nk, nv, config, D, D, torch.float32, shared_bits=0.25) == qaq.solve(nk, nv, lower, D, D,
                                                                                          torch.float32)


def test_per_layer_eps_gives_each_layer_the_target_where_one_eps_lets_a_wide_layer_take_the_bits():
    from kvpass.methods.qaq.fit import solve, solve_shares

    g = torch.Generator().manual_seed(0)
    config = QAQConfig(target_bits=6.0)
    # layer 1's numerators are 100x layer 0's (keys with a bias: wider ranges), the same distribution otherwise
    base = [torch.rand(2, 400, generator=g) for _ in range(2)]
    nums = {0: (base[0], base[1]), 1: (100 * base[0], 100 * base[1])}
    acts = {f"{i}.{w}": [torch.zeros(2, 400, D)] for i in (0, 1) for w in "kv"}
    shared, one = solve_shares(acts, nums, config)
    apart, each = solve_shares(acts, nums, dataclasses.replace(config, per_layer_eps=True))
    assert len(set(one.values())) == 1 and each[1] == pytest.approx(100 * each[0], rel=1e-3)
    for layer in (0, 1):  # alone, each layer's eps is the one solving the target on its own tokens
        assert each[layer] == solve([nums[layer][0]], [nums[layer][1]], config, D, D)
    tier = lambda shares, layer: float((shares[CalibKey(layer, "k", "tier_share")] * torch.arange(4)).sum())
    assert tier(apart, 0) == pytest.approx(tier(apart, 1), abs=0.02)  # the same bits for both
    assert tier(shared, 0) == 0 and tier(shared, 1) > 0.2  # one eps: the wide layer takes every higher tier
    cal = kvpass.Calibration("m", "h", {}, {})
    from kvpass.methods.qaq.handler import layer_eps, set_eps

    set_eps(cal, each, 6.0)
    assert layer_eps(cal, 1) == each[1] and cal.meta["eps"] == pytest.approx((each[0] * each[1]) ** 0.5)
    with pytest.raises(KVPassError, match="per_layer_eps solves each layer's eps for a target"):
        QAQConfig(eps=0.1, per_layer_eps=True)


def test_qaq_6x_codes_its_lowest_value_tier_per_channel_against_calibrated_ranges():
    preset = get_method("qaq-6x")
    assert abs(preset.nominal_bits(head_dim=64, tokens=2048) - 16 / 6) < 1e-9  # 6x at 2k tokens, all counted
    # its tiers with a target the tiny head dim (16: metadata and outliers cost 4x what they do at 64) can reach
    m = dataclasses.replace(preset, qaq=dataclasses.replace(preset.qaq, target_bits=6.0, target_context=None, window=5))
    model = build("llama")
    cal = kvpass.calibrate(model, calibration_ids(), m, n_samples=2, seq_len=96)
    values = cal.for_layer(0, "v")
    assert values["t0_lo"].shape == (1, 2, 1, D) and values["t0_lut"].shape == (1, 2, 1, D, 4)
    qm = kvpass.compile(model, m, max_cache_len=64, batch_size=2, calibration=cal)
    ids, mask = prompt(2, length=30)
    assert qm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]).shape == (2, 38)
    levels = qaq.unpack_map(qm.graph_module.kvpass_cache_0_qaq_v_map)[:, :, :33]
    assert (levels == 1).sum() > 0  # tokens in the per-channel tier
    real = sum(b.numel() * b.element_size() for n, b in qm.graph_module.named_buffers() if n.startswith("kvpass_"))
    assert qm.cache_report().nbytes == real


@pytest.mark.parametrize("arch,pre_rope", [("llama", False), ("gpt_neox", True)])
def test_model_precision_tier_is_exact_and_generates_the_same_tokens(arch, pre_rope):
    model = build(arch)
    m = method(eps=1.0, tiers=("none",), pre_rope=pre_rope)
    cal = kvpass.calibrate(model, calibration_ids(), m, n_samples=1, seq_len=64)
    ids, mask = prompt(2, length=20)
    fp = kvpass.compile(model, "fp16", max_cache_len=48, batch_size=2)
    qm = kvpass.compile(model, m, max_cache_len=48, batch_size=2, calibration=cal)
    torch.testing.assert_close(qm(ids, attention_mask=mask), fp(ids, attention_mask=mask), rtol=1e-5, atol=1e-5)
    assert torch.equal(qm.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[]),
                       fp.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[]))
    if pre_rope:  # what the tiers hold is the key before RoPE, not the rotated key the model writes
        post = kvpass.compile(model, method(eps=1.0, tiers=("none",)), max_cache_len=48, batch_size=2,
                              calibration=cal)
        post(ids, attention_mask=mask)
        qm.reset()
        qm(ids, attention_mask=mask)
        held = [x.graph_module.kvpass_cache_0_qaq_k_t0_data for x in (qm, post)]
        assert (held[0] - held[1]).abs().amax() > 1e-2


@pytest.mark.parametrize("pre_rope,window_dtype", [(False, None), (True, "int8")])
def test_prompt_in_chunks_reads_the_cache_as_decoding_does(pre_rope, window_dtype):
    # eps so large that every token but the sink goes to int4: the tiers cannot differ between the two runs, so
    # the logits can only match if each query in a chunk reads the tokens that left its window as stored (and
    # its window as the ring holds it, in int8 rows with window_dtype)
    model = build("llama")
    m = method(eps=1e9, tiers=("int4:per_token", "fp16"), pre_rope=pre_rope, window_dtype=window_dtype)
    cal = kvpass.calibrate(model, calibration_ids(), m, n_samples=1, seq_len=64)
    qm = kvpass.compile(model, m, max_cache_len=48, calibration=cal)
    ring = qm.graph_module.kvpass_cache_0_qaq_v_ring
    assert ring.dtype == (torch.float16 if window_dtype is None else torch.int8)
    ids, _ = prompt(1, length=30)
    chunked = qm(ids)
    qm.reset()
    stepped = torch.cat([qm(ids[:, i:i + 1]) for i in range(ids.shape[1])], 1)
    torch.testing.assert_close(chunked, stepped, rtol=1e-4, atol=1e-4)
    fp = kvpass.compile(model, "fp16", max_cache_len=48)(ids)
    assert (chunked - fp).abs().amax() > 1e-3  # the int4 tier really is read


def test_calibration_ranks_keys_stored_before_rope_by_their_stored_range_and_rotated_attention():
    # the key formula's range is of the keys as stored (before RoPE); the attention that weighs it is the rotated
    # keys' (the model's): the recording holds both
    model = build("llama")
    m = method(target=8.0, pre_rope=True)
    acts = record(model, token_samples(calibration_ids(), None, 1, 64, 0), m)
    q, k, k_rope, v = (acts[f"0.{w}"][0] for w in ("q", "k", "k_rope", "v"))
    assert (k - k_rope).abs().amax() > 1e-2 and torch.allclose(k[:, 0], k_rope[:, 0], atol=1e-6)  # position 0: no turn
    scale = float(acts["0.scale"][0])
    nk, nv = qaq.sensitivities(q, k_rope, v, scale, m.qaq, stored_k=k)
    ref_k, ref_v = qaq.sensitivities(q, k_rope, v, scale, m.qaq)
    torch.testing.assert_close(nv, ref_v)  # the values' numerators see only the rotated keys' attention
    ratio = qaq.token_range(k) / qaq.token_range(k_rope)
    torch.testing.assert_close(nk, ref_k * ratio, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma3"])
def test_qaq_generates_and_accounts_bytes(arch):
    model = build(arch)
    m = method(target=8.0)
    cal = kvpass.calibrate(model, calibration_ids(), m, n_samples=2, seq_len=96)
    qm = kvpass.compile(model, m, max_cache_len=64, batch_size=2, calibration=cal)
    ids, mask = prompt(2, length=30)
    assert qm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]).shape == (2, 38)
    report = qm.cache_report()
    real = sum(b.numel() * b.element_size() for n, b in qm.graph_module.named_buffers() if n.startswith("kvpass_"))
    assert report.nbytes == real == sum(layout.nbytes for layout in qm.layouts)
    # the closed form: each tier's entries at that tier's bytes per token, the uint8 map, the window ring (fp16, the
    # highest tier's precision, in this fp32 model) and its fp32 attention, and the query-norm statistics
    for layout in qm.layouts:
        kt, vt = layout.detail
        b, h = kt.batch, kt.heads
        expected = 0
        for tl in (kt, vt):
            per_token = [CacheLayout.build(s, (1, 1, 1, tl.head_dim), tl.dtype).nbytes for s in tl.config.tiers]
            expected += b * h * sum(c * p for c, p in zip(tl.capacity, per_token))
            expected += b * h * ((tl.max_len + 1) // 2) + b * h * tl.config.ring * tl.head_dim * 2
            assert sum(tl.capacity) == tl.max_len
        expected += b * h * kt.config.ring * 4 + b * h * 3 * 4
        assert layout.nbytes == expected
    # tokens past the window are in tiers, the newest window - 1 are not yet
    tier_map = qaq.unpack_map(qm.graph_module.kvpass_cache_0_qaq_k_map)
    assert (tier_map[:, :, :37 - 4] > 0).all() and (tier_map[:, :, 37 - 4:] == 0).all()


def test_calibration_round_trip_and_errors(tmp_path):
    model = build("llama")
    m = method(target=9.0)
    cal = kvpass.calibrate(model, calibration_ids(), m, n_samples=2, seq_len=64)
    cal.save(tmp_path / "qaq")
    loaded = kvpass.Calibration.load(tmp_path / "qaq")
    ids, _ = prompt(1, length=24)
    a = kvpass.compile(model, m, max_cache_len=32, calibration=cal)(ids)
    b = kvpass.compile(model, m, max_cache_len=32, calibration=loaded)(ids)
    assert torch.equal(a, b)
    with pytest.raises(KVPassError, match="needs calibration"):
        kvpass.compile(model, m, max_cache_len=32)
    with pytest.raises(KVPassError, match="outside what these tiers can average"):
        kvpass.calibrate(model, calibration_ids(), method(target=2.5), n_samples=1, seq_len=64)
    with pytest.raises(KVPassError, match="exactly one knob"):
        QAQConfig(target_bits=4.0, eps=0.1)
    with pytest.raises(KVPassError, match="code each token alone"):
        QAQConfig(eps=0.1, tiers=("int2:per_channel:g32|residual=32",))


def test_static_key_tiers_calibrate_compile_and_account_bytes():
    keys = ("nuq2:per_channel:static:channel_lut:qnorm+outliers1%", "nuq4:per_channel:static:channel_lut+outliers1%",
            "int8:per_token", "fp16")
    config = QAQConfig(target_bits=7.5, key_tiers=keys)
    m = MethodConfig("qaq-test-static-keys", "QAQ test preset", "none", "none", max_chunk=8, qaq=config)
    model = build("llama")
    cal = kvpass.calibrate(model, calibration_ids(), m, n_samples=2, seq_len=96)
    keys = cal.for_layer(0, "k")
    lo, hi = keys["t0_lo"], keys["t0_hi"]
    assert lo.shape == (1, 2, 1, D) and (hi > lo).all() and keys["t1_lut"].shape == (1, 2, 1, D, 16)
    assert "t0_lo" not in cal.for_layer(0, "v")  # the value tiers are per token
    qm = kvpass.compile(model, m, max_cache_len=64, batch_size=2, calibration=cal)
    assert torch.equal(qm.graph_module.kvpass_cache_0_qaq_k_static_t0_lo, lo)
    ids, mask = prompt(2, length=30)
    first = qm(ids, attention_mask=mask)
    qm.reset()  # empties the cache but keeps the calibrated tensors: the same call gives the same logits
    torch.testing.assert_close(qm(ids, attention_mask=mask), first, rtol=0, atol=0)
    assert torch.equal(qm.graph_module.kvpass_cache_0_qaq_k_static_t0_lo, lo)
    qm.reset()
    assert qm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]).shape == (2, 38)
    report = qm.cache_report()
    real = sum(b.numel() * b.element_size() for n, b in qm.graph_module.named_buffers() if n.startswith("kvpass_"))
    assert report.nbytes == real
    for which in "kv":  # the first slot (the attention sink) is always in the highest tier
        assert (qaq.unpack_map(getattr(qm.graph_module, f"kvpass_cache_0_qaq_{which}_map"))[:, :, 0] == 4).all()
    for layout in qm.layouts:  # the closed form: per-token bytes per entry, each tier's calibrated tensors once
        kt, vt = layout.detail
        b, h = kt.batch, kt.heads
        # the key tiers' lo, hi, sensitivity and LUT per head and channel (and Q-Norm's 8 bytes), only in a tier
        # that has entries
        static = [2 * h * D * 2 + h * D * 2 + h * D * 4 * 2 + 8, 2 * h * D * 2 + h * D * 2 + h * D * 16 * 2]
        expected = sum(st for st, c in zip(static, kt.capacity) if c) + b * h * (kt.config.ring * 4 + 3 * 4)
        for tl, which in ((kt, "k"), (vt, "v")):
            per_token = [qaq.token_nbytes(s, D, tl.dtype) for s in tl.config.tiers_for(which)]
            expected += b * h * (sum(c * p for c, p in zip(tl.capacity, per_token)) + (tl.max_len + 1) // 2 + tl.config.ring * D * 2)
        assert layout.nbytes == expected
    # a calibration without the key tiers' tensors is a clear error
    del cal.tensors[CalibKey(0, "k", "t0_lo")]
    with pytest.raises(KVPassError, match="t0_lo is not in the calibration"):
        kvpass.compile(model, m, max_cache_len=64, calibration=cal)


def test_value_tiers_with_a_calibrated_lut_per_layer():
    values = ("nuq2:per_token:qnorm+outliers1%", "nuq4:per_token", "int8:per_token", "fp16")
    config = QAQConfig(target_bits=6.5, tiers=values)
    m = MethodConfig("qaq-test-nuq-values", "QAQ test preset", "none", "none", max_chunk=8, qaq=config)
    model = build("llama")
    cal = kvpass.calibrate(model, calibration_ids(), m, n_samples=2, seq_len=96)
    lut2, lut4 = cal.for_layer(0, "v")["t0_lut"], cal.for_layer(0, "v")["t1_lut"]
    assert lut2.shape == (4,) and lut4.shape == (16,) and (lut2.diff() > 0).all()
    assert not torch.allclose(lut2.float(), normal_float_grid(2).float(), atol=1e-2)  # fitted, not the default
    assert "t0_qnorm" in cal.for_layer(0, "v") and "t0_lut" in cal.for_layer(0, "k")  # no key_tiers: keys use the same tiers
    qm = kvpass.compile(model, m, max_cache_len=64, batch_size=2, calibration=cal)
    assert torch.equal(qm.graph_module.kvpass_cache_0_qaq_v_static_t0_lut, lut2.to(torch.float16))
    ids, mask = prompt(2, length=30)
    first = qm(ids, attention_mask=mask)
    qm.reset()
    torch.testing.assert_close(qm(ids, attention_mask=mask), first, rtol=0, atol=0)
    report = qm.cache_report()
    real = sum(b.numel() * b.element_size() for n, b in qm.graph_module.named_buffers() if n.startswith("kvpass_"))
    assert report.nbytes == real


def test_retained_copy_is_counted_and_generates():
    model = build("llama")
    plain = method(target=8.0)
    # the same method with the copy (the calibration does not depend on it, so it is shared)
    kept = dataclasses.replace(plain, qaq=dataclasses.replace(plain.qaq, retain=True))
    assert kept.nominal_bits() == pytest.approx(plain.nominal_bits() + 16)
    cal = kvpass.calibrate(model, calibration_ids(), kept, n_samples=2, seq_len=96)
    qm = kvpass.compile(model, kept, max_cache_len=64, batch_size=2, calibration=cal)
    base = kvpass.compile(model, plain, max_cache_len=64, batch_size=2, calibration=cal)
    ids, mask = prompt(2, length=30)
    assert qm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]).shape == (2, 38)
    report = qm.cache_report()
    real = sum(b.numel() * b.element_size() for n, b in qm.graph_module.named_buffers() if n.startswith("kvpass_"))
    copies = sum(2 * 2 * site.kv_heads * 64 * site.head_dim * 4 for site in qm.sites)  # k and v, batch 2, fp32
    assert report.nbytes == real == base.cache_report().nbytes + copies
    fp = model(ids, attention_mask=mask).logits
    qm.reset()
    moved = qm(ids, attention_mask=mask)
    assert (moved - fp).abs().amax() > 1e-4  # still quantized: the copy is for re-coding, not for reading
