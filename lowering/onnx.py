"""ONNX export of a compiled model: one step with the packed cache as explicit inputs and outputs.

The exported step takes the step's own inputs (``input_ids [B, T]``, ``cache_position [T]``, ``attention_mask [B,
max_cache_len]``, ``position_ids [B, T]`` for a transformers model; ``tokens [B, T]``, ``positions [T]`` for a plain
module), with ``T`` dynamic so one model serves prefill chunks and decode, and every per-sequence cache buffer as an
input ``past.<buffer>``; it returns ``logits`` and the written buffers as ``present.<buffer>``, byte for byte what the
:class:`~kvpass.KVPassModel` holds after the same call. Calibrated tensors (LUTs, ranges) are initializers.

How: a copy of the rewritten graph has its kvpass op nodes replaced by functional plain-torch kernels
(:mod:`kvpass.lowering.onnx_kernels`); a wrapper module feeds the past tensors in as the graph's buffers (cloned, so
the writes become outputs rather than silently dropped buffer mutations) and torch.onnx exports it at opset 21 with
standard ops only. The ``tensorrt`` flavour is the same step restricted to what TensorRT's ONNX parser accepts.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from kvpass.lowering import onnx_kernels
from kvpass.lowering.onnx_kernels import KERNELS
from torch import nn

from kvpass.errors import KVPassError
from kvpass.formats import packing
from kvpass.kvcache import parse_cache_spec
from kvpass.ops.meta import AttentionMeta, CacheRead

if TYPE_CHECKING:
    from kvpass.model import KVPassModel

FLAVORS = ("onnxruntime", "tensorrt")
OPSET = 21
METADATA_KEY = "kvpass"
HF_INPUTS = ("input_ids", "cache_position", "attention_mask", "position_ids")
MODULE_INPUTS = ("tokens", "positions")


def cache_names(qm: KVPassModel) -> list[str]:
    """The per-sequence buffers that are the exported step's ``past.*`` inputs and ``present.*`` outputs."""
    return [r.name for r in qm.buffers if r.role.per_sequence]


def check_exportable(qm: KVPassModel) -> None:
    """Raise a :class:`KVPassError` naming the first op or spec of ``qm`` that does not export."""
    if qm.info.kind == "module" and len(_placeholders(qm)) != 2:
        raise KVPassError(f"only modules called as (tokens, positions) -> logits export; this one takes "
                          f"{_placeholders(qm)}")
    for node in qm.graph_module.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "namespace", None) != "kvpass":
            continue
        specs = _specs(node)
        if node.target not in KERNELS:
            raise KVPassError(
                f"method {qm.method.name!r} does not export to ONNX yet: its caches ({', '.join(specs) or 'state'}) "
                f"are written and attended by {node.target.name()}, which has no ONNX lowering; the methods of "
                "kv_store_ / kv_attention / kv_recent_attention_ with recent=W export (int, nuq, lm and fp8 codes, "
                "calibrated ranges, outliers, sink, recent window)"
            )
        residual = [spec for spec in specs if parse_cache_spec(spec).residual]
        if residual:
            raise KVPassError(
                f"method {qm.method.name!r} does not export to ONNX yet: its caches ({', '.join(residual)}) keep a "
                "residual ring (KIVI's residual=R, coded a block at a time), which kv_recent_attention_'s ONNX "
                "lowering does not write yet; a recent window (recent=W) exports"
            )
        centred = [spec for spec in specs if parse_cache_spec(spec).centre]
        if centred:
            raise KVPassError(
                f"method {qm.method.name!r} does not export to ONNX yet: its caches ({', '.join(centred)}) code tokens "
                "minus a centre the first write sets (centre=N), which the ONNX lowering does not compute yet; drop "
                "centre=N from the spec to export"
            )


def _specs(node: torch.fx.Node) -> list[str]:
    """The cache specs a kvpass op node carries (its spec argument or the specs inside its metadata)."""
    out = []
    for arg in node.args:
        if isinstance(arg, str) and arg.startswith("k="):
            meta = AttentionMeta.parse(arg)
            out += [meta.k, meta.v]
        elif isinstance(arg, str) and arg.startswith("spec="):
            out.append(CacheRead.parse(arg).spec)
        elif isinstance(arg, str) and _is_spec(arg):
            out.append(arg)
    return out


def _is_spec(text: str) -> bool:
    try:
        parse_cache_spec(text)
    except KVPassError:
        return False
    return True


def step_inputs(qm: KVPassModel) -> tuple[str, ...]:
    """The names of the exported step's own inputs, before the ``past.*`` ones."""
    return HF_INPUTS if qm.info.kind == "hf" else MODULE_INPUTS


def _placeholders(qm: KVPassModel) -> list[str]:
    return [n.name for n in qm.graph_module.graph.nodes if n.op == "placeholder"]


class ExportStep(nn.Module):
    """One step over explicit cache tensors: ``(*step inputs, *past) -> (logits, *present)``."""

    def __init__(self, qm: KVPassModel) -> None:
        super().__init__()
        gm = copy.deepcopy(qm).graph_module  # the model keeps its own graph and cache
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in KERNELS:
                node.target = KERNELS[node.target]
        gm.recompile()
        self.gm = gm
        self.names = cache_names(qm)
        self.inputs = len(_placeholders(qm))

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs, past = args[:self.inputs], args[self.inputs:]
        state = {name: p.clone() for name, p in zip(self.names, past)}
        logits = torch.func.functional_call(self.gm, state, inputs, strict=False)
        return (logits, *(state[name] for name in self.names))


def example_inputs(qm: KVPassModel, tokens: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs of a ``tokens``-long first step (the exporter traces with them; ``T`` stays dynamic)."""
    b, n, dev = qm.batch_size, qm.max_cache_len, qm.device
    ids = torch.ones(b, tokens, dtype=torch.long, device=dev)
    positions = torch.arange(tokens, device=dev)
    if qm.info.kind == "module":
        return ids, positions
    return ids, positions, torch.ones(b, n, dtype=torch.long, device=dev), positions[None].expand(b, tokens)


def metadata(qm: KVPassModel, flavor: str) -> dict:
    """What a runtime needs besides the graph: shapes, the I/O names, the tokens and the cache report's parts."""
    buffers = dict(qm.graph_module.named_buffers())
    gen = qm.generation_config
    report = qm.cache_report().as_dict()
    return {
        "format": 1, "flavor": flavor, "method": qm.method.name, "kind": qm.info.kind,
        "batch_size": qm.batch_size, "max_cache_len": qm.max_cache_len, "prefill_chunk": qm.prefill_chunk,
        "vocab_size": getattr(qm.config, "vocab_size", None),
        "eos_token_id": getattr(gen, "eos_token_id", None), "pad_token_id": getattr(gen, "pad_token_id", None),
        "inputs": list(step_inputs(qm)),
        "cache": [{"name": r.name, "layer": r.layer, "role": r.role.value, "shape": list(buffers[r.name].shape),
                   "dtype": str(buffers[r.name].dtype).replace("torch.", "")}
                  for r in qm.buffers if r.role.per_sequence],
        "fixed_bytes": {r.name: buffers[r.name].numel() * buffers[r.name].element_size()
                        for r in qm.buffers if not r.role.per_sequence},
        "report": {"dense_dtype": report["dense_dtype"],
                   "layers": [{k: layer[k] for k in ("layer", "key_spec", "value_spec", "dense_nbytes", "elements",
                                                     "sliding_window")} | {"buffers": list(layer["buffers"])}
                              for layer in report["layers"]]},
    }


@contextlib.contextmanager
def _quiet_registry():
    """torch.onnx logs a warning per missing torchvision op at every export; they say nothing about kvpass."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_onnx(qm: KVPassModel, path: str | Path, flavor: str = "onnxruntime", *, opset: int = OPSET,
                verbose: bool = False) -> Path:
    """Export ``qm``'s step to the ONNX file ``path`` (standard ops only; runs in a stock ``onnxruntime``).

    Inputs: the step's own inputs, then ``past.<buffer>`` for every per-sequence cache buffer; outputs: ``logits``
    then ``present.<buffer>``. kvpass's description of the cache (names, shapes, batch, length) is stored in the
    model's metadata under ``"kvpass"`` for :class:`kvpass.onnx.OrtModel`. ``flavor="tensorrt"``: uint8 only at the
    inputs and outputs, every node checked against TensorRT's ONNX parser table (:mod:`kvpass.lowering.tensorrt`).
    Returns the path.
    """
    if flavor not in FLAVORS:
        raise KVPassError(f"flavor={flavor!r} is not an export flavour; use one of {FLAVORS}")
    check_exportable(qm)
    names = cache_names(qm)
    buffers = dict(qm.graph_module.named_buffers())
    past = tuple(torch.zeros_like(buffers[n]) for n in names)
    inputs = example_inputs(qm)
    tokens = torch.export.Dim("tokens", min=1, max=qm.max_cache_len)
    dims = ({1: tokens}, {0: tokens}) if qm.info.kind == "module" else ({1: tokens}, {0: tokens}, None, {1: tokens})
    step = ExportStep(qm).eval()
    input_names = [*step_inputs(qm), *(f"past.{n}" for n in names)]
    output_names = ["logits", *(f"present.{n}" for n in names)]
    widen = onnx_kernels.bytes_as_int32() if flavor == "tensorrt" else contextlib.nullcontext()
    with warnings.catch_warnings(), packing.arithmetic(), widen, torch.no_grad(), _quiet_registry():
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            ep = torch.export.export(step, (*inputs, *past), dynamic_shapes=((*dims, *([None] * len(past))),),
                                     strict=False)
            program = torch.onnx.export(ep, f=None, dynamo=True, opset_version=opset, input_names=input_names,
                                        output_names=output_names, verbose=verbose)
        except KVPassError:
            raise
        except Exception as err:
            raise KVPassError(f"method {qm.method.name!r} failed to export to ONNX: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from err
    program.model.metadata_props[METADATA_KEY] = json.dumps(metadata(qm, flavor))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if flavor == "onnxruntime":
        program.save(str(path))
        return path
    import onnx
    from kvpass.lowering.tensorrt import bytes_only_at_io, parser_problems

    model = bytes_only_at_io(program.model_proto)
    problems = parser_problems(model)
    if problems:
        raise KVPassError(f"method {qm.method.name!r} does not export in the tensorrt flavour: {len(problems)} nodes "
                          f"TensorRT's ONNX parser refuses, e.g. {'; '.join(problems[:3])}")
    large = sum(len(t.raw_data) for t in model.graph.initializer) > 1_800_000_000  # protobuf's 2 GB limit
    onnx.save_model(model, str(path), save_as_external_data=large)
    return path
