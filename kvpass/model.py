"""``KVPassModel``: the rewritten step with its packed cache, a ``generate()`` loop and ``cache_report()``."""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kvpass.errors import KVPassError
from kvpass.generation import StepLoop
from kvpass.ops import journal
from kvpass.pipeline.buffers import BufferRecord, Role
from kvpass.pipeline.capture import CaptureInfo
from kvpass.pipeline.locate import AttentionSite
from kvpass.pipeline.plan import KVLayout
from kvpass.report import CacheReport, build_report

if TYPE_CHECKING:
    from kvpass.methods.base import MethodConfig


class KVPassModel(nn.Module, StepLoop):
    """A causal LM whose KV cache lives in packed low-bit buffers.

    Calls append to the cache: ``model(input_ids)`` writes the tokens after those already cached and returns
    their logits; :meth:`reset` empties the cache; :meth:`generate` resets, prefills the prompt in chunks and
    decodes. For a module that is not from transformers, ``model(*inputs)`` calls the rewritten module with its
    own signature, and ``generate`` works when that signature is ``(tokens [B, T], positions [T]) -> logits``.
    """

    def __init__(
        self,
        graph_module: torch.fx.GraphModule,
        info: CaptureInfo,
        sites: list[AttentionSite],
        layouts: list[KVLayout],
        method: MethodConfig,
        buffers: list[BufferRecord],
        config: Any = None,
        generation_config: Any = None,
        prefill_chunk: int = 512,
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.info = info
        self.sites = sites
        self.layouts = layouts
        self.method = method
        self.buffers = buffers  # what the rewrite added, each with its layer and role
        self.config = config
        self.generation_config = generation_config
        self.prefill_chunk = prefill_chunk
        self.device = next((b.device for b in graph_module.buffers()), torch.device("cpu"))
        self._graph = graph_module  # what a step calls: the graph module, or its torch.compile'd form
        self._seen = 0
        self._mask = torch.zeros(info.batch_size, info.max_cache_len, dtype=torch.long, device=self.device)

    def __deepcopy__(self, memo: dict) -> KVPassModel:
        """An independent copy: its own graph, parameters and cache buffers (the cached tokens included)."""
        gm = self.graph_module
        with warnings.catch_warnings():  # torch's pytree spec copy warns about its deprecated LeafSpec check
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            graph = copy.deepcopy(gm.graph)
        root = {n.target: copy.deepcopy(_attr(gm, n.target), memo) for n in graph.nodes if n.op == "get_attr"}
        # called submodules are export's stateless input guards: shared, not copied
        root |= {n.target: _attr(gm, n.target) for n in graph.nodes if n.op == "call_module"}
        new = KVPassModel(torch.fx.GraphModule(root, graph), self.info, self.sites, self.layouts, self.method,
                          self.buffers, self.config, self.generation_config, self.prefill_chunk)
        new._seen = self._seen
        new._mask.copy_(self._mask)
        return new

    def __reduce_ex__(self, protocol):
        raise KVPassError(
            "a KVPassModel cannot be pickled or torch.save()d whole (its exported graph holds local functions); "
            "save the calibration (Calibration.save) and compile again with kvpass.compile(model, method, "
            "calibration=path); copy.deepcopy(qm) copies a compiled model in memory"
        )

    @property
    def max_cache_len(self) -> int:
        return self.info.max_cache_len

    @property
    def batch_size(self) -> int:
        return self.info.batch_size

    @property
    def seen_tokens(self) -> int:
        """Tokens written to the cache since the last :meth:`reset`."""
        return self._seen

    def reset(self) -> None:
        """Empty the cache (zero its buffers) so the next call starts at position 0."""
        self._seen = 0
        self._mask.zero_()
        for record in self.buffers:
            if record.role.per_sequence:
                self.graph_module.get_buffer(record.name).zero_()

    def compile_step(self, backend: str = "inductor", **options: Any) -> KVPassModel:
        """Run every later step through ``torch.compile(graph_module, backend=backend, dynamic=True, **options)``:
        Inductor fuses the model's own ops around the kvpass ops, which it calls as extern kernels. The first
        prefill and the first decode step compile (minutes for a real model). Returns ``self``."""
        self._graph = torch.compile(self.graph_module, backend=backend, dynamic=True, **options)
        return self

    @torch.no_grad()
    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self.info.kind == "module":
            return self.graph_module(*args, **kwargs)
        return self.step(*args, **kwargs)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Write ``input_ids`` ``[B, T]`` after the cached tokens and return their logits ``[B, T, vocab]``.

        ``attention_mask`` covers the new tokens (``[B, T]``) or everything so far (``[B, cached + T]``); 0 marks
        padding. Position ids continue each row's own count of real tokens, as transformers' generate does.
        """
        input_ids = self._check_ids(input_ids)
        b, t = input_ids.shape
        self._check_batch(b)
        self._check_room(t, "compile with a larger max_cache_len (kvpass.compile(..., max_cache_len=...)) or call reset()")
        new_mask = self._new_mask(attention_mask, b, t)
        chunk = self.method.max_chunk or t  # methods that choose what to keep from attention write prompts in pieces
        # every input is checked before the first chunk is written; should a kernel still fail, the token count, the
        # padding mask and every piece of state rewritten in place go back to where they were (from an empty cache,
        # by emptying it again)
        if self._seen == 0:
            try:
                return self._write_chunks(input_ids, new_mask, chunk)
            except BaseException:
                self.reset()
                raise
        seen, mask = self._seen, self._mask.clone()
        small = {r.name: self.graph_module.get_buffer(r.name) for r in self.buffers if r.role in (Role.RING, Role.ENTRY)}
        kept = {name: buf.clone() for name, buf in small.items()}
        with journal.recording() as log:
            try:
                return self._write_chunks(input_ids, new_mask, chunk)
            except BaseException:
                self._seen = seen
                self._mask.copy_(mask)
                for name, buf in small.items():
                    buf.copy_(kept[name])
                log.undo()
                raise

    def _write_chunks(self, input_ids: torch.Tensor, new_mask: torch.Tensor, chunk: int) -> torch.Tensor:
        t = input_ids.shape[1]
        return torch.cat([self._write(input_ids[:, i:i + chunk], new_mask[:, i:i + chunk]) for i in range(0, t, chunk)],
                         dim=1)

    def _write(self, input_ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        """Run one checked chunk: write its tokens after the cached ones and return their logits."""
        b, t = input_ids.shape
        logits = self._graph(*self._step_inputs(input_ids, new_mask))
        self._seen += t
        return logits[:b]

    def _module_step(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        self._check_room(t, "max_cache_len is the length of the module's own cache buffers: allocate longer ones")
        positions = torch.arange(self._seen, self._seen + t, device=self.device)
        out = self._graph(tokens.to(self.device), positions)
        self._seen += t
        return out

    def _run(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self._module_step(tokens) if self.info.kind == "module" else self.step(tokens, mask)

    def _check_generate(self, attention_mask) -> None:
        if self.info.kind != "module":
            return
        if attention_mask is not None and not bool((torch.as_tensor(attention_mask) != 0).all()):
            raise KVPassError("padding masks need a transformers model; this module's step takes (tokens, positions)")
        params = list(inspect.signature(self.graph_module.forward).parameters)
        if len(params) != 2:
            raise KVPassError(f"generate() needs a module called as (tokens, positions) -> logits; this one takes {params}")

    def _longer_cache_fix(self, needed: int) -> str:
        if self.info.kind == "hf":
            return super()._longer_cache_fix(needed)
        return "allocate longer cache buffers in the module"

    def cache_report(self) -> CacheReport:
        """Bytes of every cache buffer, bits per element and the full-precision bytes replaced, per layer."""
        dense = str(self.sites[0].dtype).replace("torch.", "") if self.sites else "float16"
        return build_report(self.method, self.layouts, dict(self.graph_module.named_buffers()), self.buffers, dense)


def _attr(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module
