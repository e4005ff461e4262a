"""QAQ without a model: its formulas, tier rounding and capacities, tier storage, the window ring and its op."""

import math

import pytest
import torch
from helpers.qaq import D

import kvpass
from kvpass.errors import KVPassError
from kvpass.kvcache import parse_cache_spec
from kvpass.methods import qaq
from kvpass.methods.qaq import QAQConfig


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
        meta = qaq.QAQMeta(";".join(config.tiers), ";".join(config.tiers), tuple(capacity), tuple(capacity),
                           config.eps, config.window, 0.95, 0, max_len, D**-0.5)
        qaq.kv_qaq_attention_(q, k, v, pos, [kb[n] for n in names], [vb[n] for n in names], state, None, pos, None,
                              None, str(meta))
    return kb, vb, names


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
    meta = qaq.QAQMeta(";".join(config.tiers), ";".join(config.tiers), (t,) * 4, (t,) * 4, 0.05, config.window, 0.95, 0,
                       t, scale)
    qaq.kv_qaq_attention_(q, k, v, torch.arange(t), [kbufs[n] for n in names], [vbufs[n] for n in names], state,
                          None, torch.arange(t), None, None, str(meta))
    # the window's attention, computed here from scratch: the largest weight a token got from itself and the next r
    probs = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~torch.ones(t, t).tril().bool(), -torch.inf), -1)
    alpha = torch.stack([probs[0, :, i:i + r + 1, i].amax() for i in range(t - r)])
    for tier_map in (qaq.unpack_map(kbufs["map"]), qaq.unpack_map(vbufs["map"])):
        decided = tier_map[0, 0, :t - r].long()
        assert (decided > 0).all() and (tier_map[0, 0, t - r:] == 0).all()  # the last r are still in the window
        order = alpha.argsort()
        assert (decided[order].diff() >= 0).all(), (alpha[order], decided[order])
        assert decided.unique().numel() > 1  # the test sees more than one tier


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
    meta = qaq.QAQMeta(";".join(config.tiers), ";".join(config.tiers), (6, 6), (6, 6), 0.1, 3, 0.95, 1, 12, D**-0.5)
    torch.library.opcheck(qaq.kv_qaq_attention_, (q, k, v, pos, [kb[n] for n in names], [vb[n] for n in names], state,
                                                  None, pos, None, None, str(meta)))


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


def test_key_tier_errors():
    with pytest.raises(KVPassError, match="bits of the value tiers"):
        QAQConfig(eps=0.1, key_tiers=("int4:per_channel:static", "int8:per_token"))
    with pytest.raises(KVPassError, match="tier 'int4:per_channel:g32.*' must code each token alone"):
        QAQConfig(eps=0.1, tiers=("int4:per_token", "none"), key_tiers=("int4:per_channel:g32|residual=32", "none"))
    with pytest.raises(KVPassError, match="cannot be stored token by token"):
        QAQConfig(eps=0.1, tiers=("int4:per_channel:g32", "none"))
    with pytest.raises(KVPassError, match="must code each token alone"):
        QAQConfig(eps=0.1, tiers=("int4:per_token|sink=1", "none"))


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
    meta = qaq.QAQMeta(";".join(config.tiers), ";".join(config.key_tiers), (0, 12), (0, 12), 1e-9, 3, 0.95, 1, 12,
                       D**-0.5)
    out = qaq.kv_qaq_attention_(q, k, v, pos, [t for n, t in kb.items() if n.startswith("t")],
                                [t for n, t in vb.items() if n.startswith("t")], state, None, pos, None, None, str(meta))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                                is_causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (qaq.unpack_map(kb["map"])[..., :7] == 2).all() and (qaq.unpack_map(vb["map"])[..., :7] == 2).all()  # decided: the second tier
