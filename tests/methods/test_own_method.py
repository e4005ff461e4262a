"""A method family of one's own, from outside the package: a config dataclass and a handler registered for its type
(keys and values of even and odd layers in two specs), compiled and generated with no change under kvpass/."""

import operator
from dataclasses import dataclass

import pytest
import torch
from helpers.generation import NEW, prompt, reference
from helpers.tiny_models import build

import kvpass
from kvpass.kvcache import CacheLayout
from kvpass.pipeline.handler import LayerPlan, MethodHandler, register_handler
from kvpass.pipeline.rewrite import add_buffers, attention_meta, get_attrs, replace_write

MAX_LEN = 48


@dataclass(frozen=True)
class Alternating:
    even: str
    odd: str


class AlternatingHandler(MethodHandler):
    def spec(self, method, layer: int) -> str:
        return method.scheme.odd if layer % 2 else method.scheme.even

    def nominal_bits(self, method, head_dim, tokens):
        return sum(8.0 * CacheLayout.build(s, (1, 1, tokens, head_dim), torch.float16).nbytes / (tokens * head_dim)
                   for s in (method.scheme.even, method.scheme.odd)) / 2

    def plan(self, method, site, calibration):
        shape = (site.batch, site.kv_heads, site.max_len)
        spec = self.spec(method, site.index)
        return LayerPlan(CacheLayout.build(spec, (*shape, site.head_dim), site.dtype),
                         CacheLayout.build(spec, (*shape, site.v_head_dim), site.dtype))

    def add_buffers(self, ctx, site, layout):
        return [add_buffers(ctx, site, w, cl) for w, cl in (("k", layout.key), ("v", layout.value))]

    def emit(self, ctx, site, layout, buffers, tables):
        (kc, ks), (vc, vs) = buffers
        replace_write(ctx.gm, site.key, kc, ks, str(layout.key.spec))
        replace_write(ctx.gm, site.value, vc, vs, str(layout.value.spec))
        q_positions = site.key.positions if site.is_causal and site.mask is None else None
        call = ctx.gm.graph.call_function(torch.ops.kvpass.kv_attention.default, (
            site.query, get_attrs(ctx.gm, kc), get_attrs(ctx.gm, ks), get_attrs(ctx.gm, vc), get_attrs(ctx.gm, vs),
            site.mask, q_positions, None, None, str(attention_meta(site, layout, None))))
        return ctx.gm.graph.call_function(operator.getitem, (call, 0))


register_handler(Alternating, AlternatingHandler())


def method(even: str, odd: str) -> kvpass.MethodConfig:
    return kvpass.MethodConfig(f"alternating-{even}-{odd}", "even and odd layers in two specs", "none", "none",
                               scheme=Alternating(even, odd))


@pytest.fixture(scope="module")
def llama():
    return build("llama")


def test_own_method_at_model_precision_generates_the_models_tokens(llama):
    ids, mask = prompt(2)
    seq, _, _ = reference(llama, ids, mask)
    qm = kvpass.compile(llama, method("none", "none"), max_cache_len=MAX_LEN, batch_size=2)
    assert torch.equal(qm.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[]), seq)


def test_own_method_stores_each_layer_in_its_own_spec_and_counts_it(llama):
    qm = kvpass.compile(llama, method("int4:per_token", "none"), max_cache_len=MAX_LEN, batch_size=1)
    report = qm.cache_report()
    assert [(r.key_spec, r.value_spec) for r in report.layers] == [("int4:per_token", "int4:per_token"),
                                                                    ("none", "none")]
    for layer, r in zip(qm.layouts, report.layers):
        assert r.nbytes == layer.key.nbytes + layer.value.nbytes
    assert report.layers[0].nbytes < report.layers[1].nbytes / 4
    ids, mask = prompt(1)
    out = qm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert out.shape == (1, ids.shape[1] + 8)


def test_a_family_without_a_handler_is_a_clear_error():
    @dataclass(frozen=True)
    class Unregistered:
        pass

    with pytest.raises(kvpass.KVPassError, match="no handler is registered for Unregistered"):
        kvpass.MethodConfig("nothing", "", "none", "none", scheme=Unregistered())
    with pytest.raises(kvpass.KVPassError, match="give one of qaq=, overlay= and scheme="):
        kvpass.MethodConfig("two", "", "none", "none", scheme=Alternating("none", "none"),
                            qaq=kvpass.get_method("qaq").qaq)
