"""Run an exported kvpass model in ONNX Runtime with the :class:`~kvpass.KVPassModel` surface.

:class:`OrtModel` holds the packed cache as numpy buffers and binds each one as both the ``past.<buffer>`` input and
the ``present.<buffer>`` output of the step (ONNX Runtime's IOBinding), so the cache is written in place, never
copied per step. ``step``, ``reset``, ``generate`` (greedy and sampling, eos, left padding) and ``cache_report``
behave as on the torch model; ``buffers`` are the cache's bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from kvpass.errors import KVPassError
from kvpass.generation import StepLoop
from kvpass.lowering.onnx import METADATA_KEY, export_onnx
from kvpass.report import CacheReport, LayerReport

__all__ = ["OrtModel", "export_onnx"]


class OrtModel(StepLoop):
    """An exported step (:func:`kvpass.export_onnx`) in an ``onnxruntime.InferenceSession``, with its cache.

    ``io_binding=False`` runs ``session.run`` and takes the returned present buffers instead (one copy per step;
    for providers where in-place binding is not wanted). Other keyword arguments go to the session.
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None, io_binding: bool = True,
                 session_options=None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.exists():
            raise KVPassError(f"no ONNX model at {self.path}; export one with kvpass.export_onnx(qm, path) or "
                              "`kvpass export --out PATH`")
        self.session = ort.InferenceSession(str(self.path), session_options,
                                            providers=providers or ["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in props:
            raise KVPassError(f"{self.path} was not exported by kvpass (no '{METADATA_KEY}' metadata); export it with "
                              "kvpass.export_onnx")
        self.meta = json.loads(props[METADATA_KEY])
        self.method = self.meta["method"]
        self.kind = self.meta["kind"]
        self.batch_size = int(self.meta["batch_size"])
        self.max_cache_len = int(self.meta["max_cache_len"])
        self.prefill_chunk = int(self.meta["prefill_chunk"])
        self.device = torch.device("cpu")
        self.config = SimpleNamespace(vocab_size=self.meta["vocab_size"])
        self.generation_config = SimpleNamespace(eos_token_id=self.meta["eos_token_id"],
                                                 pad_token_id=self.meta["pad_token_id"])
        self.io_binding = io_binding
        self.buffers = {c["name"]: np.zeros(c["shape"], dtype=_numpy_dtype(c["dtype"])) for c in self.meta["cache"]}
        self._values = {}
        if io_binding:
            self._values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.buffers.items()}
        self._seen = 0
        self._mask = torch.zeros(self.batch_size, self.max_cache_len, dtype=torch.long)

    @property
    def seen_tokens(self) -> int:
        return self._seen

    def reset(self) -> None:
        """Empty the cache so the next call starts at position 0."""
        self._seen = 0
        self._mask.zero_()
        for array in self.buffers.values():
            array.fill(0)

    def step(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Write ``input_ids`` ``[B, T]`` after the cached tokens and return their logits ``[B, T, vocab]``
        (``attention_mask`` as for :meth:`kvpass.KVPassModel.step`)."""
        input_ids = self._check_ids(input_ids)
        b, t = input_ids.shape
        self._check_batch(b)
        self._check_room(t, f"export with a larger max_cache_len than {self.max_cache_len} or call reset()")
        if self.kind == "module" and attention_mask is not None:
            raise KVPassError("padding masks need a transformers model; this module's step takes (tokens, positions)")
        new_mask = self._new_mask(attention_mask, b, t)
        mask = self._mask.clone()
        try:
            ids, cache_position, full_mask, positions = self._step_inputs(input_ids, new_mask)
            inputs = (ids, cache_position) if self.kind == "module" else (ids, cache_position, full_mask, positions)
            logits = self._call({name: x.numpy() for name, x in zip(self.meta["inputs"], inputs)})
        except BaseException:
            self._mask.copy_(mask)
            raise
        self._seen += t
        return torch.from_numpy(logits[:b])

    __call__ = step  # model(ids) as for KVPassModel (kvpass eval calls it so)

    def _call(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        if not self.io_binding:
            names = list(self.buffers)
            outs = self.session.run(["logits", *(f"present.{n}" for n in names)],
                                    feed | {f"past.{n}": a for n, a in self.buffers.items()})
            for name, out in zip(names, outs[1:]):
                self.buffers[name][...] = out
            return outs[0]
        binding = self.session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in self._values.items():
            binding.bind_ortvalue_input(f"past.{name}", value)
            binding.bind_ortvalue_output(f"present.{name}", value)
        binding.bind_output("logits")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[-1].numpy()

    def _run(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.step(tokens, mask)

    def _longer_cache_fix(self, needed: int) -> str:
        return f"export a model compiled with max_cache_len={needed} or more"

    def cache_report(self) -> CacheReport:
        """Bytes of every cache buffer (the held past/present buffers and the exported fixed tensors) per layer."""
        size = {n: a.nbytes for n, a in self.buffers.items()} | self.meta["fixed_bytes"]
        layers = []
        for layer in self.meta["report"]["layers"]:
            mine = {n: size[n] for n in layer["buffers"]}
            layers.append(LayerReport(layer["layer"], layer["key_spec"], layer["value_spec"], mine, sum(mine.values()),
                                      layer["dense_nbytes"], layer["elements"], layer["sliding_window"]))
        owned = {n for layer in self.meta["report"]["layers"] for n in layer["buffers"]}
        shared = {n: b for n, b in size.items() if n not in owned}
        return CacheReport(self.method, layers, self.meta["report"]["dense_dtype"], shared)


def _numpy_dtype(name: str) -> np.dtype:
    return torch.empty(0, dtype=getattr(torch, name)).numpy().dtype
