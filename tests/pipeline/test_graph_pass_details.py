"""Locate details, eager attention, chunked prefill, re-export/compile, memory and every error path."""

import pytest
import torch
import torch.nn.functional as F
from helpers.generation import prompt, reference
from helpers.plain_decoder import PlainDecoder
from helpers.tiny_models import build
from torch import nn

import kvpass
from kvpass import KVPassError
from kvpass.pipeline.capture import capture_hf
from kvpass.pipeline.locate import locate


def test_locate_finds_every_part_of_a_site():
    model = build("llama")
    gm, _ = capture_hf(model, 2, 32)
    sites = locate(gm)
    assert len(sites) == 2
    for i, s in enumerate(sites):
        assert (s.kind, s.q_heads, s.kv_heads, s.gqa_groups, s.head_dim, s.max_len, s.batch) == ("sdpa", 4, 2, 2, 16, 32, 2)
        assert s.scale == pytest.approx(16**-0.5)
        assert s.key.buffer == f"key_cache_{i}" and s.value.buffer == f"value_cache_{i}"
        assert s.mask is not None and s.mask.meta["val"].shape[-1] == 32
        assert s.rope is not None and s.rope.variant == "half" and s.rope.rotary_dim == 16
        pre = s.rope.pre.meta["val"].shape  # [B, Hkv, T, D] before RoPE
        assert (pre[0], pre[1], pre[3]) == (2, 2, 16)
        assert s.rope.pre is not s.key.new and s.value.new.meta["val"].shape[1] == 2


def test_partial_and_interleaved_rope_are_recognised():
    gm, _ = capture_hf(build("gpt_neox"), 1, 16)
    assert {(s.rope.variant, s.rope.rotary_dim) for s in locate(gm)} == {("half", 4)}
    assert all(s.rope.pre.meta["val"].shape[-1] == 16 for s in locate(gm))  # the whole head before partial RoPE
    qm = kvpass.compile(PlainDecoder(), "fp16", example_inputs=(torch.zeros(1, 2, dtype=torch.long), torch.arange(2)))
    assert {s.rope.variant for s in qm.sites} == {"interleaved"}
    gm, _ = capture_hf(build("gpt2"), 1, 16)
    assert all(s.rope is None for s in locate(gm))


def test_eager_attention_pattern_is_rewritten_exactly():
    model = build("llama", attn="eager")
    ids, mask = prompt(2)
    seq, _, _ = reference(model, ids, mask)
    qm = kvpass.compile(model, "fp16", max_cache_len=48, batch_size=2)
    assert {s.kind for s in qm.sites} == {"eager"}
    targets = {n.target for n in qm.graph_module.graph.nodes}
    assert torch.ops.aten.softmax.int not in targets and torch.ops.kvpass.kv_attention.default in targets
    assert torch.equal(qm.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[]), seq)


def test_load_mode_matches_fused():
    model = build("qwen2")
    ids, mask = prompt(2)
    fused = kvpass.compile(model, "int4", max_cache_len=48, batch_size=2)
    load = kvpass.compile(model, "int4", max_cache_len=48, batch_size=2, attention="load")
    assert torch.ops.kvpass.kv_load.default in {n.target for n in load.graph_module.graph.nodes}
    torch.testing.assert_close(fused(ids, attention_mask=mask), load(ids, attention_mask=mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["fp16", "int4"])
def test_prefill_in_pieces_equals_prefill_at_once(method):
    model = build("mistral")
    ids, mask = prompt(2, length=12)
    qm = kvpass.compile(model, method, max_cache_len=48, batch_size=2)
    whole = qm(ids, attention_mask=mask)
    qm.reset()
    first = qm(ids[:, :5], attention_mask=mask[:, :5])
    second = qm(ids[:, 5:], attention_mask=mask)  # the mask may also cover every token so far
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-5, atol=1e-5)
    a = qm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    qm.prefill_chunk = 4
    assert torch.equal(qm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]), a)


def test_batch_one_compiled_for_one():
    model = build("phi3")
    ids, mask = prompt(1)
    seq, _, _ = reference(model, ids, mask)
    qm = kvpass.compile(model, "fp16", max_cache_len=32, batch_size=1)
    assert torch.equal(qm.generate(ids, max_new_tokens=16, eos_token_id=[]), seq)


def test_rewritten_module_reexports_and_compiles():
    model = build("llama")
    qm = kvpass.compile(model, "int4", max_cache_len=32, batch_size=2)
    ids, mask = prompt(2, length=6)
    expected = qm(ids, attention_mask=mask)
    step_args = (ids, torch.arange(6), torch.ones(2, 32, dtype=torch.long), torch.arange(6)[None].repeat(2, 1))
    step_args[2][:, :6] = mask
    qm.reset()
    tokens = torch.export.Dim("tokens", min=1, max=32)
    ep = torch.export.export(qm.graph_module, step_args, dynamic_shapes=({1: tokens}, {0: tokens}, None, {1: tokens}),
                             strict=False)
    assert torch.ops.kvpass.kv_store_.default in {n.target for n in ep.graph.nodes}
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    args = (ids, torch.arange(6), step_args[2], positions)
    torch.testing.assert_close(ep.module()(*args), expected, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(qm.graph_module, backend="inductor")
    qm.reset()
    with torch.no_grad():  # the ops have no autograd formula: inference only
        torch.testing.assert_close(compiled(*args), expected, rtol=1e-4, atol=1e-4)


def test_int4_cache_at_32k_tokens_is_under_030_of_fp16():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=128, max_position_embeddings=32768)
    qm = kvpass.compile(LlamaForCausalLM(cfg), "int4", max_cache_len=32768, batch_size=1)
    real = sum(b.numel() * b.element_size() for n, b in qm.graph_module.named_buffers() if n.startswith("kvpass_cache_"))
    fp16 = 2 * 1 * 1 * 32768 * 128 * 2  # keys + values of one layer in fp16
    assert real == qm.cache_report().nbytes
    assert real <= 0.30 * fp16, real / fp16
    assert qm(torch.tensor([[1, 2, 3]])).shape == (1, 3, 64)


def test_gemma3_sliding_layers_are_reported():
    qm = kvpass.compile(build("gemma3"), "int8", max_cache_len=32, batch_size=1)
    report = qm.cache_report()
    assert [layer.sliding_window for layer in report.layers] == [8, 8, None]
    assert "sliding window 8, stored full length" in str(report)


# ---- errors -------------------------------------------------------------------------------------------------------

class CacheSum(nn.Module):
    """Writes a cache but has no attention."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.register_buffer("k_cache", torch.zeros(1, 2, 16, 4))

    def forward(self, tokens, positions):
        self.k_cache[:, :, positions] = self.emb(tokens).view(1, -1, 2, 4).transpose(1, 2)
        return self.k_cache.sum()


class SlicedCache(nn.Module):
    """Attends over a slice of the cache: a variant kvpass cannot carry over to a packed cache."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.register_buffer("k_cache", torch.zeros(1, 2, 16, 4))
        self.register_buffer("v_cache", torch.zeros(1, 2, 16, 4))

    def forward(self, tokens, positions):
        x = self.emb(tokens).view(1, -1, 2, 4).transpose(1, 2)
        self.k_cache[:, :, positions] = x
        self.v_cache[:, :, positions] = x
        return F.scaled_dot_product_attention(x, self.k_cache[:, :, :8] * 2, self.v_cache[:, :, :8])


class DynamicCacheModel(nn.Module):
    """Keeps its cache as inputs and outputs, not buffers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)

    def forward(self, tokens, positions):
        x = self.emb(tokens).view(1, -1, 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(x, x, x, is_causal=True)


EXAMPLE = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2))


def test_error_no_attention():
    with pytest.raises(KVPassError, match=r"no attention found in the graph of CacheSum.*k_cache"):
        kvpass.compile(CacheSum(), "int8", example_inputs=EXAMPLE)


def test_error_unsupported_attention_variant_names_the_node():
    with pytest.raises(KVPassError, match=r"unsupported attention variant: the key of node 'scaled_dot_product_attention'.*"
                                          r"through node '(slice|mul)"):
        kvpass.compile(SlicedCache(), "int8", example_inputs=EXAMPLE)


def test_error_dynamic_only_cache():
    with pytest.raises(KVPassError, match="holds no 4-D buffer that could be a static KV cache"):
        kvpass.compile(DynamicCacheModel(), "int8", example_inputs=EXAMPLE)


def test_error_context_longer_than_the_cache_and_batch_too_large():
    qm = kvpass.compile(build("llama"), "int8", max_cache_len=16, batch_size=1)
    with pytest.raises(KVPassError, match=r"prompt of 10 tokens \+ max_new_tokens=10 = 20 exceeds max_cache_len=16.*"
                                          r"max_cache_len=20"):
        qm.generate(torch.ones(1, 10, dtype=torch.long), max_new_tokens=10)
    qm.reset()
    qm(torch.ones(1, 10, dtype=torch.long))
    with pytest.raises(KVPassError, match=r"10 cached \+ 7 new tokens = 17 > max_cache_len=16"):
        qm(torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(KVPassError, match=r"batch of 3 is larger than the compiled batch_size=1.*batch_size=3"):
        qm.generate(torch.ones(3, 4, dtype=torch.long), max_new_tokens=2)


def test_error_unknown_method_lists_valid_ones():
    with pytest.raises(KVPassError, match=r"unknown method 'int5'; valid methods: .*fp16.*int4.*int8"):
        kvpass.compile(build("llama"), "int5")


def test_error_not_a_transformers_model_without_example_inputs():
    with pytest.raises(KVPassError, match="pass example_inputs"):
        kvpass.compile(CacheSum(), "int8")


@pytest.mark.parametrize("write", ["index", "slice"])
def test_plain_decoder_matches_itself_and_generates(write):
    ref = PlainDecoder(write=write)
    toks = torch.randint(0, 80, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(toks, torch.arange(12))
    qm = kvpass.compile(PlainDecoder(write=write), "fp16", example_inputs=EXAMPLE)
    torch.testing.assert_close(qm(toks, torch.arange(12)), expected, rtol=1e-5, atol=1e-5)
    writes = {torch.ops.aten.index_put_.default, torch.ops.aten.copy_.default, torch.ops.aten.index_copy_.default}
    assert not writes & {n.target for n in qm.graph_module.graph.nodes}
    seq = toks[:, :5]
    greedy = PlainDecoder(write=write)
    with torch.no_grad():
        logits = greedy(seq, torch.arange(5))
        for _ in range(10):
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
            logits = greedy(seq[:, -1:], torch.tensor([seq.shape[1] - 1]))
    assert torch.equal(qm.generate(toks[:, :5], max_new_tokens=10), seq)
    q8 = kvpass.compile(PlainDecoder(write=write), "int8", example_inputs=EXAMPLE)
    assert not [n for n, b in q8.graph_module.named_buffers() if b.is_floating_point() and b.ndim == 4 and b.shape[-1] > 1]
    assert {b.dtype for n, b in q8.graph_module.named_buffers() if n.endswith("_codes")} == {torch.uint8}


def test_sampling_and_streamer():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            self.ended = True

    qm = kvpass.compile(build("llama"), "int8", max_cache_len=40, batch_size=1)
    ids, _ = prompt(1)
    greedy = qm.generate(ids, max_new_tokens=8, eos_token_id=[])
    streamer = Collect()
    top1 = qm.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, temperature=0.7, eos_token_id=[],
                       streamer=streamer, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, greedy)  # top-k 1 sampling is greedy
    assert streamer.ended and torch.equal(streamer.chunks[0], ids) and len(streamer.chunks) == 9
    g = torch.Generator().manual_seed(5)
    a = qm.generate(ids, max_new_tokens=8, do_sample=True, top_p=0.9, generator=g, eos_token_id=[])
    b = qm.generate(ids, max_new_tokens=8, do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(5),
                    eos_token_id=[])
    assert torch.equal(a, b)
    eos = int(greedy[0, ids.shape[1] + 2])
    stopped = qm.generate(ids, max_new_tokens=8, eos_token_id=eos)
    assert stopped.shape[1] <= ids.shape[1] + 3 and stopped[0, -1] == eos


def test_no_full_precision_cache_survives_anywhere():
    import gc

    from torch._subclasses.fake_tensor import FakeTensor

    model = build("llama")
    qm = kvpass.compile(model, "int4", max_cache_len=40, batch_size=3)  # a shape no other tensor has
    gc.collect()
    shape = (3, 2, 40, 16)
    live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor)
            and o.device.type != "meta" and tuple(o.shape) == shape and o.is_floating_point()
            and o.untyped_storage().nbytes() > 0]
    assert not live, f"{len(live)} full-precision cache tensors still hold memory"
    assert qm(torch.ones(3, 4, dtype=torch.long)).shape == (3, 4, 96)
