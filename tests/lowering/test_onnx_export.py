"""ONNX export: the exported step run in a stock ONNX Runtime against the torch model (KVPassModel.step).

For every exportable method on tiny Llama (GQA, RoPE), Qwen2 (key bias), GPT-2 (no RoPE) and the plain decoder: a
left-padded prompt then 8 greedy decode steps; logits within 1e-4 at every step, the same tokens, and the present
buffers byte-equal to the torch model's buffers after every step (float buffers in the model's dtype within 1e-5:
ONNX Runtime's float32 matmuls round differently from torch's). Also: the graph passes ``onnx.checker`` with
``full_check``, uses the standard domain only, the cache is explicit I/O, and what does not export says why.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.generation import prompt
from helpers.plain_decoder import PlainDecoder
from helpers.tiny_models import build
from kvpass.lowering.onnx import cache_names

import kvpass

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from kvpass.onnx import OrtModel

CALIB_TOKENS = torch.randint(3, 96, (3000,), generator=torch.Generator().manual_seed(0))
MAX_LEN = 32


def compiled(arch: str, method: str | kvpass.MethodConfig, batch: int = 2) -> kvpass.KVPassModel:
    model = build(arch)
    cal = (kvpass.calibrate(model, [CALIB_TOKENS], method, n_samples=2, seq_len=MAX_LEN)
           if kvpass.get_method(method).uses_calibration else None)
    return kvpass.compile(model, method, max_cache_len=MAX_LEN, batch_size=batch, calibration=cal)


def assert_same_cache(om: OrtModel, qm: kvpass.KVPassModel) -> None:
    """Float buffers within 1e-5; coded buffers byte-equal but for at most 1% of their elements: the keys and values
    themselves differ by float32 rounding between the runtimes, which moves a code or fp16 scale whose value sits
    on a rounding boundary (given equal inputs the lowering writes equal bytes: the store test below)."""
    for name in cache_names(qm):
        ours, theirs = om.buffers[name], qm.graph_module.get_buffer(name).numpy()
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
        if ours.dtype == np.float32:  # exact tokens at model precision (a float cache, a sink)
            np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0, err_msg=name)
        else:
            assert (ours != theirs).mean() <= 0.01, f"{name}: {(ours != theirs).sum()} of {ours.size} differ"


def decode_both(qm, om, ids, mask, steps: int = 8) -> None:
    qm.reset()
    om.reset()
    ref, got = qm.step(ids, attention_mask=mask), om.step(ids, attention_mask=mask)
    for i in range(steps + 1):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        assert_same_cache(om, qm)
        if i == steps:
            break
        nxt, nxt_ort = ref[:, -1].argmax(-1, keepdim=True), got[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(nxt, nxt_ort)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        ref, got = qm.step(nxt, attention_mask=mask), om.step(nxt, attention_mask=mask)


@pytest.mark.parametrize(("arch", "method"), [("llama", "int4"), ("qwen2", "kvquant-2bit"), ("gpt2", "fp8"),
                                            ("llama", "tq-k3v4"), ("qwen2", "kvquant-2bit-1%")])
def test_exported_step_decodes_as_the_torch_model(arch, method, tmp_path):
    qm = compiled(arch, method)
    path = kvpass.export_onnx(qm, tmp_path / "model.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert {op.domain for op in model.opset_import} <= {"", "ai.onnx"}
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    names = cache_names(qm)
    assert [i.name for i in model.graph.input] == [*kvpass.lowering.onnx.HF_INPUTS, *(f"past.{n}" for n in names)]
    assert [o.name for o in model.graph.output] == ["logits", *(f"present.{n}" for n in names)]
    ids, mask = prompt(2)
    decode_both(qm, OrtModel(path), ids, mask)
    if method == "int4":
        decode_both(qm, OrtModel(path, io_binding=False), ids, mask, steps=2)


def test_generate_and_report_match(tmp_path):
    """generate() through ONNX Runtime (greedy and seeded sampling, left padding) gives the torch model's tokens,
    cache_report() the same bytes, and a bare onnxruntime loop over the file the same tokens."""
    qm = compiled("llama", "int4")
    path = kvpass.export_onnx(qm, tmp_path / "model.onnx")
    om = OrtModel(path)
    ids, mask = prompt(2)
    assert torch.equal(om.generate(ids, attention_mask=mask, max_new_tokens=10),
                       qm.generate(ids, attention_mask=mask, max_new_tokens=10))
    assert_same_cache(om, qm)
    sample = {"do_sample": True, "top_k": 5, "temperature": 0.8, "max_new_tokens": 8}
    assert torch.equal(om.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(3), **sample),
                       qm.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(3), **sample))
    assert om.cache_report().as_dict() == qm.cache_report().as_dict()
    plain_onnxruntime_loop(path, qm)


def plain_onnxruntime_loop(path, qm) -> None:
    """The exported file alone: an InferenceSession fed zeroed past buffers decodes the torch model's tokens."""
    session = ort.InferenceSession(str(path))  # as the README shows it
    np_type = {"tensor(uint8)": np.uint8, "tensor(float16)": np.float16, "tensor(float)": np.float32,
               "tensor(int64)": np.int64}
    past = {i.name: np.zeros(i.shape, np_type[i.type]) for i in session.get_inputs() if i.name.startswith("past.")}
    tokens = np.array([[5, 17, 33, 8], [9, 4, 61, 20]])
    ids, seen = tokens, 0
    for _ in range(6):
        t = ids.shape[1]
        feed = {"input_ids": ids, "cache_position": np.arange(seen, seen + t),
                "attention_mask": np.ones((2, MAX_LEN), np.int64),
                "position_ids": np.broadcast_to(np.arange(seen, seen + t), (2, t)).copy()}
        logits, *present = session.run(None, feed | past)
        past = {f"past.{o.name[8:]}": p for o, p in zip(session.get_outputs()[1:], present)}
        seen += t
        ids = logits[:, -1].argmax(-1)[:, None]
        tokens = np.concatenate([tokens, ids], 1)
    assert tokens.tolist() == qm.generate(torch.tensor(tokens[:, :4]), max_new_tokens=6).tolist()


def test_plain_decoder_exports(tmp_path):
    qm = kvpass.compile(PlainDecoder(batch=1, max_len=MAX_LEN), "int4",
                        example_inputs=(torch.zeros(1, 2, dtype=torch.long), torch.arange(2)))
    path = kvpass.export_onnx(qm, tmp_path / "plain.onnx")
    om = OrtModel(path)
    ids = torch.randint(0, 80, (1, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(om.generate(ids, max_new_tokens=8), qm.generate(ids, max_new_tokens=8))
    assert_same_cache(om, qm)


@pytest.mark.parametrize(("method", "reason"), [
    ("kivi-2bit", "residual ring"), ("mikv", "kv_balance_"),
    ("h2o", "kv_overlay"),
])
def test_methods_that_do_not_export_say_why(method, reason, tmp_path):
    qm = compiled("llama", method)
    with pytest.raises(kvpass.KVPassError, match=reason):
        kvpass.export_onnx(qm, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_a_centred_cache_does_not_export_and_says_why(tmp_path):
    spec = "int4:per_token:g16|centre=8"
    qm = compiled("llama", kvpass.MethodConfig("int4-centred", "int4 minus a centre", spec, spec))
    with pytest.raises(kvpass.KVPassError, match="centre=N"):
        kvpass.export_onnx(qm, tmp_path / "model.onnx")


def test_bad_flavor_and_missing_file(tmp_path):
    qm = compiled("llama", "int4", batch=1)
    with pytest.raises(kvpass.KVPassError, match="not an export flavour"):
        kvpass.export_onnx(qm, tmp_path / "m.onnx", flavor="tflite")
    with pytest.raises(kvpass.KVPassError, match="no ONNX model"):
        OrtModel(tmp_path / "missing.onnx")


STORE_SPECS = [
    "int1:per_token", "int3:per_token:g8", "int5:per_token", "int6:per_token:g16", "int7:per_token",
    "int4:per_token:g8:scale_fp32", "nuq3:per_token:qnorm", "nuq4:per_token+outliers2%|sink=2",
    "int3:per_channel:static", "nuq2:per_channel:static:channel_lut+outliers1%", "fp8_e5m2:per_token",
    "fp8_e4m3:per_head",
]


class _Stores(torch.nn.Module):
    """One kv_store_ then kv_load per spec over explicit buffers, as the exporter lowers them."""

    def __init__(self, layouts, statics) -> None:
        super().__init__()
        from kvpass.ops.meta import CacheRead

        self.layouts, self.statics = layouts, statics
        self.reads = [str(CacheRead(str(lay.spec), lay.head_dim, lay.max_len)) for lay in layouts]
        self.counts = [len(lay.buffer_specs()) for lay in layouts]

    def forward(self, new, positions, *caches):
        from kvpass.lowering import onnx_kernels

        out, i = [], 0
        for layout, static, read, n in zip(self.layouts, self.statics, self.reads, self.counts):
            cache = [c.clone() for c in caches[i:i + n]]
            i += n
            onnx_kernels.store(cache, static, new, positions, str(layout.spec))
            out += [onnx_kernels.load(cache, static, None, None, new.dtype, read), *cache]
        return tuple(out)


def test_store_lowering_writes_the_reference_bytes(tmp_path):
    """The exported store and load are the reference kv_store_ and kv_load bit for bit, given the same inputs
    (every packing width, groups, fp32 scales, nuq LUTs, outliers, sink, calibrated ranges, fp8 codes); the
    dequantized values within an ulp (torch fuses zero + code * scale into one rounding, ONNX Runtime rounds twice)."""
    from kvpass import kvcache
    from kvpass.formats import packing
    from kvpass.kvcache import CacheLayout

    b, h, n, d = 2, 2, 16, 32
    g = torch.Generator().manual_seed(0)
    layouts, caches, statics = [], [], []
    for spec in STORE_SPECS:
        layout = CacheLayout.build(spec, (b, h, n, d), torch.float32)
        static = {}
        if layout.format.static:
            static = {"lo": -2 - torch.rand(1, h, 1, d, generator=g), "hi": 2 + torch.rand(1, h, 1, d, generator=g)}
            static = {k: v.to(layout.format.scale_dtype) for k, v in static.items()}
            if layout.format.outlier_frac:
                static["sens"] = torch.rand(1, h, 1, d, generator=g).half()
        cache, stat = layout.allocate("cpu", static)
        layouts.append(layout)
        caches.append(cache)
        statics.append(stat)
    new = torch.randn(b, h, 5, d, generator=g) * 3
    positions = torch.tensor([0, 1, 2, 7, 9])
    flat = [c for cache in caches for c in cache]
    with packing.arithmetic():
        ep = torch.export.export(_Stores(layouts, statics), (new, positions, *flat), strict=False)
    torch.onnx.export(ep, f=str(tmp_path / "store.onnx"), dynamo=True, opset_version=21)
    session = ort.InferenceSession(str(tmp_path / "store.onnx"))
    feed = dict(zip([i.name for i in session.get_inputs()], [new.numpy(), positions.numpy(), *(c.numpy() for c in flat)]))
    outs = iter(session.run(None, feed))
    for spec, layout, cache, stat in zip(STORE_SPECS, layouts, caches, statics):
        dense = next(outs)
        written = [next(outs) for _ in cache]
        kvcache.store(cache, stat, new, positions, layout.spec)
        for name, ours, theirs in zip(kvcache.cache_names(layout.spec), written, cache):
            assert np.array_equal(ours, theirs.numpy()), f"{spec} {name}"
        torch.testing.assert_close(torch.from_numpy(dense), kvcache.load(cache, stat, layout.spec, d, n, torch.float32),
                                   atol=2e-6, rtol=2e-6, msg=spec)


@pytest.mark.parametrize(("arch", "method"), [("qwen2", "kvquant-2bit")])
def test_tensorrt_flavour_passes_the_parser_table_and_decodes_as_the_torch_model(arch, method, tmp_path):
    """flavor="tensorrt": no node the pinned TensorRT parser table refuses (uint8 only at the inputs and outputs,
    no shift, bitwise, Mod or float64), and in ONNX Runtime the same logits, tokens and cache as the torch model."""
    from kvpass.lowering.tensorrt import parser_problems

    qm = compiled(arch, method)
    path = kvpass.export_onnx(qm, tmp_path / "trt.onnx", flavor="tensorrt")
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert parser_problems(model) == []
    assert not {"BitShift", "BitwiseAnd", "BitwiseOr", "Mod"} & {n.op_type for n in model.graph.node}
    ids, mask = prompt(2)
    decode_both(qm, OrtModel(path), ids, mask, steps=4)


def test_parser_table_check_names_what_tensorrt_refuses(tmp_path):
    """The check is not vacuous: a BitShift, an int32 ReduceSum and a uint8 ScatterND inside the network (what the
    onnxruntime flavour writes bytes with) are refused, and fp8 casts stop the tensorrt export with the reason."""
    from kvpass.lowering.tensorrt import parser_problems, support_table
    from onnx import TensorProto, helper

    assert "BitShift" not in support_table() and support_table()["ScatterND"] == {"FP32", "FP16", "INT8", "INT32"}
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("BitShift", ["a", "b"], ["c"], direction="LEFT"),
         helper.make_node("ReduceSum", ["i", "axes"], ["s"]),
         helper.make_node("Cast", ["f"], ["u"], to=TensorProto.UINT8),
         helper.make_node("ScatterND", ["u", "idx", "u"], ["w"])], "g",
        [value("a", TensorProto.UINT32, [4]), value("b", TensorProto.UINT32, [4]), value("i", TensorProto.INT32, [4]),
         value("f", TensorProto.FLOAT, [4])],
        [value("c", TensorProto.UINT32, [4]), value("s", TensorProto.INT32, [1]), value("w", TensorProto.UINT8, [4])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [0]), helper.make_tensor("idx", TensorProto.INT64, [4, 1],
                                                                                     [0, 1, 2, 3])])
    problems = parser_problems(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert any("no BitShift" in p for p in problems) and any(p.startswith("ReduceSum") and "INT32" in p for p in problems)
    assert any(p.startswith("ScatterND") and "uint8 tensor u inside" in p for p in problems)
    fp8 = compiled("llama", "fp8", batch=1)
    with pytest.raises(kvpass.KVPassError, match="FP8"):
        kvpass.export_onnx(fp8, tmp_path / "fp8.onnx", flavor="tensorrt")
