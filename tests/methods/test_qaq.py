"""QAQ: per-token bits from attention, tiers with static capacities, eps solved for a target on calibration data."""

import dataclasses
import math

import pytest
import torch
from helpers.generation import prompt
from helpers.tiny_models import VOCAB, build

import kvpass
from kvpass.calibration.record import record, token_samples
from kvpass.errors import KVPassError
from kvpass.formats.nuq import normal_float_grid
from kvpass.kvcache import CacheLayout, parse_cache_spec
from kvpass.methods import MethodConfig, get_method, qaq
from kvpass.methods.qaq import QAQConfig

D = 16  # the tiny models' head dim: metadata costs more per element than at 64 or 128


def method(target=None, eps=None, tiers=None, window=5, pre_rope=False, window_dtype=None) -> MethodConfig:
    kw = {} if tiers is None else {"tiers": tiers}
    config = QAQConfig(target_bits=target, eps=eps, window=window, window_dtype=window_dtype, **kw)
    return MethodConfig(f"qaq-test-{target}-{eps}", "QAQ test preset", "none", "none", max_chunk=8, qaq=config,
                        pre_rope_keys=pre_rope)


def calibration_ids(n=600, seed=0):
    return [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))]


def test_bits_grow_with_attention_and_range_and_shrink_with_eps():
    alpha = torch.linspace(0, 1, 101)
    r = torch.full_like(alpha, 3.0)
    for eps in (1e-3, 1e-2, 1e-1):
        vb = qaq.value_bits(alpha, r, eps)
        kb = qaq.key_bits(alpha, r, torch.tensor(4.0), 64, eps)
        assert (vb.diff() >= 0).all() and (kb.diff() >= 0).all()  # more attention, never fewer bits
    assert (qaq.value_bits(alpha, r, 1e-3) >= qaq.value_bits(alpha, r, 1e-2)).all()
    assert (qaq.value_bits(alpha[50:51], torch.tensor([1.0, 2.0, 4.0]), 1e-2).diff() >= 0).all()
    # the closed forms: B_v = ceil(log2(1 + a r / eps)), B_k = ceil(log2(1 + a(1-a) |q| r / (sqrt(d) eps)))
    assert float(qaq.value_bits(torch.tensor(0.25), torch.tensor(2.0), 0.01)) == math.ceil(math.log2(1 + 50))
    assert float(qaq.key_bits(torch.tensor(0.25), torch.tensor(2.0), torch.tensor(8.0), 64, 0.01)) == \
        math.ceil(math.log2(1 + 0.25 * 0.75 * 8 * 2 / (8 * 0.01)))


def test_query_norm_quantile_of_a_lognormal():
    g = torch.Generator().manual_seed(0)
    logn = 1.0 + 0.5 * torch.randn(200_000, generator=g)
    stats = torch.stack([torch.tensor(float(len(logn))), logn.sum(), logn.pow(2).sum()])
    expected = math.exp(1.0 + 1.6448536 * 0.5)
    assert abs(float(qaq.quantile_norm(stats, 0.95)) / expected - 1) < 0.01


def test_tier_rounding_and_capacities():
    tiers = (2, 4, 8, 16)
    assert qaq.to_tier(torch.tensor([0.0, 1, 2, 3, 4, 5, 8, 9, 16, 30]), tiers).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    caps = qaq.capacities(torch.tensor([0.5, 0.3, 0.15, 0.05]), 100)
    assert caps == [50, 30, 15, 5] and sum(qaq.capacities(torch.tensor([0.0, 0.6, 0.6, 0.1]), 10)) == 10
    assert qaq.capacities(torch.tensor([0.9, 0.1, 0.0, 0.0]), 10, sink=1) == [8, 1, 0, 1]  # the sink's entry
    assert qaq.capacities(torch.tensor([0.0, 0.0, 1.0, 0.0]), 10, sink=2) == [0, 0, 8, 2]


def test_full_tier_sends_tokens_to_the_nearest_lower_then_higher_tier():
    tier_map = torch.zeros(1, 1, 16, dtype=torch.uint8)
    tier_map[..., :3] = torch.tensor([2, 2, 3], dtype=torch.uint8)  # tier 1 already holds 2 entries, tier 2 one
    tiers, entries = qaq.assign(tier_map, 3, torch.tensor([[[1, 1, 0]]]), [1, 2, 2, 1])
    # tier 1 is full: the first goes down to tier 0, the second (tier 0 now full too) up to tier 2; the third wants
    # tier 0, full, and the nearest higher tier with room is 3
    assert tiers[0, 0].tolist() == [0, 2, 3]
    assert entries[0, 0].tolist() == [0, 1, 0]
    with pytest.raises(KVPassError, match="no tier has room"):
        qaq.assign(tier_map, 3, torch.tensor([[[1, 1, 0, 0]]]), [1, 2, 2, 1])


def test_tiers_store_and_read_back_each_token():
    config = QAQConfig(eps=1.0, tiers=("int4:per_token", "int8:per_token", "none"))
    layout = qaq.TierLayout(config, (4, 4, 4), 1, 2, 12, D, torch.float32)
    bufs = layout.allocate("cpu")
    specs = layout.specs
    tensors = qaq.split_buffers([bufs[n] for n in bufs if n.startswith("t")], specs)
    x = torch.randn(1, 2, 12, D)
    wanted = torch.tensor([0, 1, 2] * 4).expand(1, 2, 12)
    tier_map = qaq.unpack_map(bufs["map"])
    tiers, entries = qaq.assign(tier_map, 0, wanted, [4, 4, 4])
    qaq.write(tensors, specs, x, tiers, entries)
    tier_map[...] = (tiers + 1).to(torch.uint8)
    back = qaq.read(tensors, specs, tier_map, 12, D, torch.float32)
    err = (back - x).abs().amax(-1) / (x.amax(-1) - x.amin(-1))
    assert torch.equal(back[..., 2::3, :], x[..., 2::3, :])  # the model-precision tier is exact
    assert (err[..., 1::3] <= 0.5 / 255 + 1e-3).all() and (err[..., 0::3] <= 0.5 / 15 + 1e-3).all()


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


def test_qaq_6x_codes_its_lowest_value_tier_per_channel_against_calibrated_ranges():
    preset = get_method("qaq-6x")
    assert abs(preset.nominal_bits(head_dim=64, tokens=2048) - 16 / 6) < 1e-9  # 6x at 2k tokens, all counted
    # its tiers with a target the tiny head dim (16: metadata and outliers cost 4x what they do at 64) can reach
    m = dataclasses.replace(preset, qaq=dataclasses.replace(preset.qaq, target_bits=6.0, target_context=None, window=5))
    model = build("llama")
    cal = kvpass.calibrate(model, calibration_ids(), m, n_samples=2, seq_len=96)
    assert cal.tensors["0.v.t0_lo"].shape == (1, 2, 1, D) and cal.tensors["0.v.t0_lut"].shape == (1, 2, 1, D, 4)
    qm = kvpass.compile(model, m, max_cache_len=64, batch_size=2, calibration=cal)
    ids, mask = prompt(2, length=30)
    assert qm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]).shape == (2, 38)
    levels = qaq.unpack_map(qm.graph_module.kvpass_cache_0_qaq_v_map)[:, :, :33]
    assert (levels == 1).sum() > 0  # tokens in the per-channel tier
    real = sum(b.numel() * b.element_size() for n, b in qm.graph_module.named_buffers() if n.startswith("kvpass_"))
    assert qm.cache_report().nbytes == real


def test_more_attention_gets_at_least_as_many_bits():
    # every key (and value) is a permutation of the same numbers, so ranges are equal and only attention differs
    g = torch.Generator().manual_seed(0)
    t, r = 24, 2
    base = torch.randn(D, generator=g)
    k = torch.stack([base[torch.randperm(D, generator=g)] for _ in range(t)])[None, None]
    v = torch.stack([base[torch.randperm(D, generator=g)] for _ in range(t)])[None, None]
    q = torch.randn(1, 2, t, D, generator=g) * 2
    config = QAQConfig(eps=0.05, window=r + 1, tiers=("int2:per_token", "int4:per_token", "int8:per_token", "none"))
    layout = qaq.TierLayout(config, (t, t, t, t), 1, 1, t, D, torch.float32)
    kbufs, vbufs = layout.allocate("cpu"), layout.allocate("cpu")
    names = [n for n in kbufs if n.startswith("t")]
    state = [kbufs["map"], vbufs["map"], kbufs["ring"], vbufs["ring"], kbufs["ring_score"], torch.zeros(1, 1, 3)]
    scale = D**-0.5
    qaq.kv_qaq_attention_(q, k, v, torch.arange(t), [kbufs[n] for n in names], [vbufs[n] for n in names], state,
                          ";".join(config.tiers), ";".join(config.tiers), [t] * 4, [t] * 4, 0.05, config.window, 0.95, 0, t, None,
                          torch.arange(t), scale)
    # the window's attention, computed here from scratch: the largest weight a token got from itself and the next r
    probs = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~torch.ones(t, t).tril().bool(), -torch.inf), -1)
    alpha = torch.stack([probs[0, :, i:i + r + 1, i].amax() for i in range(t - r)])
    for tier_map in (qaq.unpack_map(kbufs["map"]), qaq.unpack_map(vbufs["map"])):
        decided = tier_map[0, 0, :t - r].long()
        assert (decided > 0).all() and (tier_map[0, 0, t - r:] == 0).all()  # the last r are still in the window
        order = alpha.argsort()
        assert (decided[order].diff() >= 0).all(), (alpha[order], decided[order])
        assert decided.unique().numel() > 1  # the test sees more than one tier


# keys stored before RoPE: the op rotates every slot by its own cached position, left padding included (gpt_neox
# rotates a part of each head)
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


def test_int8_window_rows_round_trip_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    # (a token whose absmax is under 127 x fp16's smallest normal, 0.008, is coded with that scale: steps of 6e-5)
    x = torch.randn(2, 3, 5, D, generator=g) * torch.logspace(-1, 3, 5)[:, None]
    x[0, 0, 0] = 0  # an all-zero token
    rows = qaq.to_ring(x, torch.int8)
    assert rows.shape == (2, 3, 5, D + 2) and rows.dtype == torch.int8
    back = qaq.from_ring(rows, torch.float32)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((back - x).abs() <= step * (0.5 + 1e-3)).all()  # the fp16 scale is within 2^-11 of absmax / 127
    assert back[0, 0, 0].eq(0).all()
    assert torch.equal(qaq.to_ring(back, torch.int8), rows)  # a decoded row codes to itself, bit for bit
    fp8 = qaq.from_ring(qaq.to_ring(x, torch.float8_e4m3fn), torch.float32)
    assert (back - x).norm() < (fp8 - x).norm() / 3


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


@pytest.mark.parametrize("retain", [False, True])
def test_qaq_op_opcheck(retain):
    config = QAQConfig(eps=0.1, window=3, tiers=("int4:per_token", "none"), retain=retain,
                       window_dtype="int8" if retain else None)
    layout = qaq.TierLayout(config, (6, 6), 1, 1, 12, D, torch.float32)
    kb, vb = layout.allocate("cpu"), layout.allocate("cpu")
    names = [n for n in kb if n.startswith("t")]
    state = [kb["map"], vb["map"], kb["ring"], vb["ring"], kb["ring_score"], torch.zeros(1, 1, 3)]
    if retain:
        state += [kb["retained"], vb["retained"]]
        kb["map"][..., :2] = vb["map"][..., :2] = 0x11  # decided slots 0-3, so that the promotion path runs
    q, k, v = torch.randn(1, 2, 4, D), torch.randn(1, 1, 4, D), torch.randn(1, 1, 4, D)
    pos = torch.arange(6, 10) if retain else torch.arange(4)
    torch.library.opcheck(qaq.kv_qaq_attention_, (q, k, v, pos, [kb[n] for n in names],
                                                  [vb[n] for n in names], state, ";".join(config.tiers), ";".join(config.tiers),
                                                  [6, 6], [6, 6],
                                                  0.1, 3, 0.95, 1, 12, None, pos, D**-0.5))


def test_static_key_tier_codes_each_channel_against_its_calibrated_range():
    config = QAQConfig(eps=1.0, tiers=("int4:per_token", "none"), key_tiers=("int4:per_channel:static", "none"))
    layout = qaq.TierLayout(config, (8, 4), 1, 2, 12, D, torch.float32, keys=True)
    assert layout.static_buffers() == ["t0_lo", "t0_hi"]
    bufs = layout.allocate("cpu")
    x = torch.randn(1, 2, 12, D) * torch.logspace(-2, 1, D)  # channels of very different ranges
    bufs["t0_lo"].copy_(x.amin(2, keepdim=True))
    bufs["t0_hi"].copy_(x.amax(2, keepdim=True))
    specs = layout.specs
    tensors = qaq.split_buffers([bufs[n] for n in bufs if n.startswith("t")], specs)
    wanted = torch.tensor([0, 0, 1] * 4).expand(1, 2, 12)
    tier_map = qaq.unpack_map(bufs["map"])
    tiers, entries = qaq.assign(tier_map, 0, wanted, [8, 4])
    qaq.write(tensors, specs, x, tiers, entries)
    tier_map[...] = (tiers + 1).to(torch.uint8)
    back = qaq.read(tensors, specs, tier_map, 12, D, torch.float32)
    step = (bufs["t0_hi"] - bufs["t0_lo"]).float() / 15  # the fp16-rounded range each channel was coded in
    low = wanted[0, 0] == 0
    assert ((back - x).abs()[:, :, low] <= step / 2 + 1e-3).all()  # per channel, not per token
    assert torch.equal(back[:, :, ~low], x[:, :, ~low])
    # the same keys per token at the same bits lose the small channels to the large ones
    per_token = qaq.TierLayout(QAQConfig(eps=1.0, tiers=("int4:per_token", "none")), (8, 4), 1, 2, 12, D,
                               torch.float32, keys=True)
    pb = per_token.allocate("cpu")
    pt = qaq.split_buffers([pb[n] for n in pb if n.startswith("t")], per_token.specs)
    qaq.write(pt, per_token.specs, x, tiers, entries)
    back_pt = qaq.read(pt, per_token.specs, tier_map, 12, D, torch.float32)
    assert (back - x)[..., :4].abs().amax() * 5 < (back_pt - x)[..., :4].abs().amax()


def test_static_key_tiers_calibrate_compile_and_account_bytes():
    keys = ("nuq2:per_channel:static:channel_lut:qnorm+outliers1%", "nuq4:per_channel:static:channel_lut+outliers1%",
            "int8:per_token", "fp16")
    config = QAQConfig(target_bits=7.5, key_tiers=keys)
    m = MethodConfig("qaq-test-static-keys", "QAQ test preset", "none", "none", max_chunk=8, qaq=config)
    model = build("llama")
    cal = kvpass.calibrate(model, calibration_ids(), m, n_samples=2, seq_len=96)
    lo, hi = cal.tensors["0.k.t0_lo"], cal.tensors["0.k.t0_hi"]
    assert lo.shape == (1, 2, 1, D) and (hi > lo).all() and cal.tensors["0.k.t1_lut"].shape == (1, 2, 1, D, 16)
    assert "0.v.t0_lo" not in cal.tensors  # the value tiers are per token
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
    del cal.tensors["0.k.t0_lo"]
    with pytest.raises(KVPassError, match="t0_lo is not in the calibration"):
        kvpass.compile(model, m, max_cache_len=64, calibration=cal)


def test_key_tier_errors():
    with pytest.raises(KVPassError, match="bits of the value tiers"):
        QAQConfig(eps=0.1, key_tiers=("int4:per_channel:static", "int8:per_token"))
    with pytest.raises(KVPassError, match="tier 'int4:per_channel:g32.*' must code each token alone"):
        QAQConfig(eps=0.1, tiers=("int4:per_token", "none"), key_tiers=("int4:per_channel:g32|residual=32", "none"))
    with pytest.raises(KVPassError, match="cannot be stored token by token"):
        QAQConfig(eps=0.1, tiers=("int4:per_channel:g32", "none"))
    with pytest.raises(KVPassError, match="must code each token alone"):
        QAQConfig(eps=0.1, tiers=("int4:per_token|sink=1", "none"))


def test_value_tiers_with_a_calibrated_lut_per_layer():
    values = ("nuq2:per_token:qnorm+outliers1%", "nuq4:per_token", "int8:per_token", "fp16")
    config = QAQConfig(target_bits=6.5, tiers=values)
    m = MethodConfig("qaq-test-nuq-values", "QAQ test preset", "none", "none", max_chunk=8, qaq=config)
    model = build("llama")
    cal = kvpass.calibrate(model, calibration_ids(), m, n_samples=2, seq_len=96)
    lut2, lut4 = cal.tensors["0.v.t0_lut"], cal.tensors["0.v.t1_lut"]
    assert lut2.shape == (4,) and lut4.shape == (16,) and (lut2.diff() > 0).all()
    assert not torch.allclose(lut2.float(), normal_float_grid(2).float(), atol=1e-2)  # fitted, not the default
    assert "0.v.t0_qnorm" in cal.tensors and "0.k.t0_lut" in cal.tensors  # no key_tiers: keys use the same tiers
    qm = kvpass.compile(model, m, max_cache_len=64, batch_size=2, calibration=cal)
    assert torch.equal(qm.graph_module.kvpass_cache_0_qaq_v_static_t0_lut, lut2.to(torch.float16))
    ids, mask = prompt(2, length=30)
    first = qm(ids, attention_mask=mask)
    qm.reset()
    torch.testing.assert_close(qm(ids, attention_mask=mask), first, rtol=0, atol=0)
    report = qm.cache_report()
    real = sum(b.numel() * b.element_size() for n, b in qm.graph_module.named_buffers() if n.startswith("kvpass_"))
    assert report.nbytes == real


def _run_op(config, capacity, calls, retain_bufs=True):
    """Run the op over ``calls`` (q, k, v, positions) on fresh single-head buffers; returns them."""
    max_len = sum(capacity)
    layout = qaq.TierLayout(config, tuple(capacity), 1, 1, max_len, D, torch.float32)
    kb, vb = layout.allocate("cpu"), layout.allocate("cpu")
    names = [n for n in kb if n.startswith("t")]
    state = [kb["map"], vb["map"], kb["ring"], vb["ring"], kb["ring_score"], torch.zeros(1, 1, 3)]
    if config.retain:
        state += [kb["retained"], vb["retained"]]
    for q, k, v, pos in calls:
        qaq.kv_qaq_attention_(q, k, v, pos, [kb[n] for n in names], [vb[n] for n in names], state,
                              ";".join(config.tiers), ";".join(config.tiers), list(capacity), list(capacity),
                              config.eps, config.window, 0.95, 0, max_len, None, pos, D**-0.5)
    return kb, vb, names


def test_retained_copy_moves_a_token_up_when_its_attention_rises():
    # 12 tokens under near-uniform attention: slot 8 gets ~1/9 in its window, 1 bit, the int2 tier. A 13th query
    # aimed at slot 8's key gives it ~all the attention: with the retained copy its value moves to the fp16 tier
    # (its fp16 rounding) and the int2 entries after it shift down by one, re-coded; without the copy it stays int2.
    g = torch.Generator().manual_seed(0)
    t = 12
    k, v = torch.randn(1, 1, t + 1, D, generator=g), torch.randn(1, 1, t + 1, D, generator=g)
    q = torch.randn(1, 2, t, D, generator=g) * 0.01
    q_hit = (k[:, :, 8:9] * 20).expand(1, 2, 1, D)
    calls = [(q, k[:, :, :t], v[:, :, :t], torch.arange(t)), (q_hit, k[:, :, t:], v[:, :, t:], torch.tensor([t]))]
    tiers = ("int2:per_token", "fp16")
    for retain in (False, True):
        config = QAQConfig(eps=0.5, window=3, tiers=tiers, sink=0, retain=retain)
        _, vb, names = _run_op(config, (t + 1, t + 1), calls[:1])
        assert qaq.unpack_map(vb["map"])[0, 0, 8] == 1  # int2 after the prompt
        _, vb, names = _run_op(config, (t + 1, t + 1), calls)
        specs = [parse_cache_spec(s) for s in tiers]
        back = qaq.read(qaq.split_buffers([vb[n] for n in names], specs), specs, qaq.unpack_map(vb["map"]), t - 1, D, torch.float32)
        if not retain:
            assert qaq.unpack_map(vb["map"])[0, 0, 8] == 1 and not torch.equal(back[0, 0, 8], v[0, 0, 8])
            continue
        assert qaq.unpack_map(vb["map"])[0, 0, 8] == 2 and torch.equal(back[0, 0, 8], v[0, 0, 8].half().float())
        assert torch.equal(vb["retained"][..., :t + 1, :], v)
        # every decided slot reads back as its own copy coded in the tier the map gives it
        for tier, spec in enumerate(specs):
            sel = qaq.unpack_map(vb["map"])[0, 0, :t - 1] == tier + 1
            x = v[:, :, :t - 1][:, :, sel]
            ref = kvpass.formats.dequantize(kvpass.formats.quantize(x, spec.format))
            torch.testing.assert_close(back[:, :, :t - 1][:, :, sel], ref, rtol=0, atol=0)
        # no room in the fp16 tier: nothing moves, nothing breaks
        _, vb, names = _run_op(config, (2 * t, 1), calls)
        assert qaq.unpack_map(vb["map"])[0, 0, 8] == 1


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


def test_a_tier_without_entries_holds_no_calibrated_tensors():
    config = QAQConfig(eps=1e-9, window=3, tiers=("int4:per_token", "none"),
                       key_tiers=("int4:per_channel:static", "none"))
    empty = qaq.TierLayout(config, (0, 12), 1, 2, 12, D, torch.float32, keys=True)
    some = qaq.TierLayout(config, (6, 6), 1, 2, 12, D, torch.float32, keys=True)
    kb = empty.allocate("cpu")
    assert kb["t0_lo"].numel() == kb["t0_hi"].numel() == 0
    full_static = sum(t.numel() * t.element_size() for n, t in some.allocate("cpu").items() if n in some.static_buffers())
    assert full_static == 2 * 2 * D * 2  # lo and hi, fp16, per head and channel
    entries = 6 * 2 * (qaq.token_nbytes("none", D, torch.float32) - qaq.token_nbytes("int4:per_channel:static", D,
                                                                                    torch.float32))
    assert empty.nbytes - some.nbytes == entries - full_static
    # the op runs with the empty tensors: every token goes to the model-precision tier, so attention is exact
    vb = qaq.TierLayout(config, (0, 12), 1, 2, 12, D, torch.float32, holds_score=False, keys=False).allocate("cpu")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 9, D, generator=g), torch.randn(1, 2, 9, D, generator=g),
               torch.randn(1, 2, 9, D, generator=g))
    state = [kb["map"], vb["map"], kb["ring"], vb["ring"], kb["ring_score"], torch.zeros(1, 2, 3)]
    pos = torch.arange(9)
    out = qaq.kv_qaq_attention_(q, k, v, pos, [t for n, t in kb.items() if n.startswith("t")],
                                [t for n, t in vb.items() if n.startswith("t")], state,
                                ";".join(config.tiers), ";".join(config.key_tiers), [0, 12], [0, 12], 1e-9, 3, 0.95,
                                1, 12, None, pos, D**-0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                                is_causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (qaq.unpack_map(kb["map"])[..., :7] == 2).all() and (qaq.unpack_map(vb["map"])[..., :7] == 2).all()  # decided: the second tier
