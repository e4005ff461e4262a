"""The grouped op metadata: one string per call that round-trips exactly and names its fields."""

import pytest
import torch

import kvpass  # noqa: F401  (registers every op)
from kvpass.errors import KVPassError
from kvpass.methods.overlay.op import OverlayMeta
from kvpass.methods.qaq.op import QAQMeta
from kvpass.ops.meta import AttentionMeta, CacheRead


@pytest.mark.parametrize("meta", [
    CacheRead("int4:per_token", 64, 512),
    CacheRead("nuq3:per_channel:static:qnorm+outliers1%|recent=32", 48, 100, "interleaved", 32),
    AttentionMeta("int2:per_channel:g32|residual=128", "int2:per_token:g32|residual=128", 64, 128, 2048, 64**-0.5,
                  "half", 64, True),
    AttentionMeta("none", "fp8_e4m3", 8, 8, 16, 0.1 + 0.2),
    QAQMeta("int2:per_token;int4:per_token;none", "int2:per_token;none", (0, 12, 7), (), 1e-9, 3, 0.95, 1, 12, 0.125),
    OverlayMeta("", "", 64, 0.5, True, True),
])
def test_meta_round_trips_exactly(meta):
    text = str(meta)
    assert type(meta).parse(text) == meta and type(meta).parse(meta) is meta
    assert len(text.split()) == len(meta.__dataclass_fields__)  # one key=value per field


def test_meta_reads_back_fields_a_kernel_needs():
    m = AttentionMeta.parse("k=int4:per_token v=int8:per_token head_dim=64 v_head_dim=32 max_len=128 scale=0.125")
    assert (m.head_dim, m.v_head_dim, m.max_len, m.scale, m.rope, m.need_mass) == (64, 32, 128, 0.125, "", False)
    assert m.key_spec.format.bits == 4 and m.value_read == CacheRead("int8:per_token", 32, 128)


def test_meta_rejects_unknown_fields_and_spaces():
    with pytest.raises(KVPassError, match="unknown field 'len'"):
        AttentionMeta.parse("k=none v=none len=4")
    with pytest.raises(KVPassError, match="space"):
        str(CacheRead("int4 per_token", 8, 8))


@pytest.mark.parametrize("op", ["kv_load", "kv_attention", "kv_recent_attention_", "kv_qaq_attention_",
                                "kv_overlay_attention_"])
def test_every_read_op_takes_tensors_and_one_meta_string(op):
    schema = getattr(torch.ops.kvpass, op).default._schema
    args = schema.arguments
    assert args[-1].name == "meta" and str(args[-1].type) == "str"
    # nothing else fixed at compile time travels beside the tensors (kv_load also takes the dtype to read in)
    others = [a.name for a in args[:-1] if "Tensor" not in str(a.type)]
    assert others == (["dtype"] if op == "kv_load" else [])
