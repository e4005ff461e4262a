"""``KVPassModel``: the rewritten step with its packed cache, a ``generate()`` loop and ``cache_report()``."""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kvpass.errors import KVPassError
from kvpass.pipeline.buffers import BufferRecord, Role
from kvpass.pipeline.capture import CaptureInfo
from kvpass.pipeline.locate import AttentionSite
from kvpass.pipeline.plan import KVLayout
from kvpass.report import CacheReport, build_report

if TYPE_CHECKING:
    from kvpass.methods.base import MethodConfig


class KVPassModel(nn.Module):
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
        self._broken = False  # a step failed part-way over state that cannot be put back
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
        new._broken = self._broken
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
        self._broken = False
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
        if self._broken:
            raise KVPassError(f"an earlier step failed part-way, and method {self.method.name!r} keeps state (overlay "
                              "entries, QAQ tiers) that cannot be put back; call reset() (generate() does) and start "
                              "the sequence again")
        input_ids = self._check_ids(input_ids)
        b, t = input_ids.shape
        self._check_batch(b)
        self._check_room(t, "compile with a larger max_cache_len (kvpass.compile(..., max_cache_len=...)) or call reset()")
        new_mask = self._new_mask(attention_mask, b, t)
        chunk = self.method.max_chunk or t  # methods that choose what to keep from attention write prompts in pieces
        # every input is checked before the first chunk is written; should a kernel still fail, the token count, the
        # padding mask and the caches' rings go back to where they were (an overlay's or QAQ's state may not)
        seen, mask = self._seen, self._mask.clone()
        rings = {r.name: self.graph_module.get_buffer(r.name) for r in self.buffers if r.role is Role.RING}
        kept = {name: buf.clone() for name, buf in rings.items()}
        try:
            return torch.cat([self._write(input_ids[:, i:i + chunk], new_mask[:, i:i + chunk])
                              for i in range(0, t, chunk)], dim=1)
        except BaseException:
            self._seen = seen
            self._mask.copy_(mask)
            for name, buf in rings.items():
                buf.copy_(kept[name])
            self._broken = any(r.role is Role.ENTRY for r in self.buffers)
            raise

    def _new_mask(self, attention_mask, b: int, t: int) -> torch.Tensor:
        """The padding mask of the ``t`` new tokens, from a mask of the new tokens or of everything so far."""
        start, end = self._seen, self._seen + t
        if attention_mask is None:
            return torch.ones(b, t, dtype=torch.long, device=self.device)
        attention_mask = torch.as_tensor(attention_mask).to(self.device).long()
        if attention_mask.shape == (b, end):
            new = attention_mask[:, start:]
        elif attention_mask.shape == (b, t):
            new = attention_mask
        else:
            raise KVPassError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({b}, {t}) for the new tokens "
                f"or ({b}, {end}) for all tokens so far"
            )
        if bool(((new != 0) & (new != 1)).any()):
            raise KVPassError("attention_mask must hold 0 (padding) and 1 (token) only")
        return new

    def _write(self, input_ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        """Run one checked chunk: write its tokens after the cached ones and return their logits."""
        b, t = input_ids.shape
        start, end = self._seen, self._seen + t
        rows = self.batch_size
        ids = torch.zeros(rows, t, dtype=torch.long, device=self.device)
        ids[:b] = input_ids.to(self.device)
        self._mask[:b, start:end] = new_mask
        self._mask[b:, start:end] = 1  # unused batch rows run on dummy tokens
        positions = self._mask[:, :end].cumsum(-1)[:, start:] - 1
        positions = positions.masked_fill(self._mask[:, start:end] == 0, 1)
        full_mask = self._mask.clone()
        full_mask[:, end:] = 1  # future slots: hidden by causality, kept 1 so no row is fully masked
        cache_position = torch.arange(start, end, device=self.device)
        logits = self._graph(ids, cache_position, full_mask, positions)
        self._seen = end
        return logits[:b]

    def _check_ids(self, input_ids) -> torch.Tensor:
        """Token ids as a ``[B, T]`` integer tensor (lists and numpy arrays are taken), each in the vocabulary."""
        if not isinstance(input_ids, torch.Tensor):
            try:
                input_ids = torch.as_tensor(input_ids)
            except (TypeError, ValueError, RuntimeError) as err:
                raise KVPassError(f"input_ids must be token ids [batch, tokens]; could not read {type(input_ids).__name__}"
                                  f" as a tensor ({err})") from err
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise KVPassError(f"input_ids must be integer token ids, got {input_ids.dtype}; pass ids.long()")
        if input_ids.ndim != 2:
            hint = "; for one sequence pass ids[None]" if input_ids.ndim == 1 else ""
            raise KVPassError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}{hint}")
        if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
            raise KVPassError(f"input_ids is empty (shape {tuple(input_ids.shape)}); give at least one token per row")
        vocab = getattr(self.config, "vocab_size", None)
        if vocab and bool(((input_ids < 0) | (input_ids >= vocab)).any()):
            bad = input_ids[(input_ids < 0) | (input_ids >= vocab)]
            raise KVPassError(f"input_ids hold {bad[0].item()}, outside the model's vocabulary [0, {vocab}); "
                              "tokenize with the model's own tokenizer")
        return input_ids

    def _check_room(self, t: int, fix: str) -> None:
        if self._seen + t > self.max_cache_len:
            raise KVPassError(f"context too long: {self._seen} cached + {t} new tokens = {self._seen + t} > "
                              f"max_cache_len={self.max_cache_len}; {fix}")

    def _check_batch(self, b: int) -> None:
        if b > self.batch_size:
            raise KVPassError(
                f"batch of {b} is larger than the compiled batch_size={self.batch_size}; compile with "
                f"kvpass.compile(..., batch_size={b}) or split the batch"
            )

    def _module_step(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        self._check_room(t, "max_cache_len is the length of the module's own cache buffers: allocate longer ones")
        positions = torch.arange(self._seen, self._seen + t, device=self.device)
        out = self._graph(tokens.to(self.device), positions)
        self._seen += t
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        streamer: Any = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Generate like transformers' ``generate``: returns ``[B, prompt + new]`` token ids.

        The prompt is prefilled in chunks of ``prefill_chunk`` tokens; left padding is handled through
        ``attention_mask``. Greedy unless ``do_sample``; ``temperature``, ``top_k`` and ``top_p`` shape the
        sampling distribution (transformers' logits warpers). Rows stop at ``eos_token_id`` (default: the
        model's generation config) and are padded with ``pad_token_id`` afterwards.
        """
        input_ids = self._check_ids(input_ids)
        b, t0 = input_ids.shape
        if max_new_tokens < 1:
            raise KVPassError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if self.info.kind == "module" and attention_mask is not None and not bool((attention_mask != 0).all()):
            raise KVPassError("padding masks need a transformers model; this module's step takes (tokens, positions)")
        if self.info.kind == "module":
            params = list(inspect.signature(self.graph_module.forward).parameters)
            if len(params) != 2:
                raise KVPassError(
                    f"generate() needs a module called as (tokens, positions) -> logits; this one takes {params}"
                )
        if t0 + max_new_tokens > self.max_cache_len:
            fix = (f"compile with kvpass.compile(..., max_cache_len={t0 + max_new_tokens}) or more"
                   if self.info.kind == "hf" else "allocate longer cache buffers in the module")
            raise KVPassError(
                f"prompt of {t0} tokens + max_new_tokens={max_new_tokens} = {t0 + max_new_tokens} exceeds "
                f"max_cache_len={self.max_cache_len}; {fix}, or ask for fewer tokens"
            )
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask)
            if attention_mask.shape == input_ids.shape and bool((attention_mask[:, -1] == 0).any()):
                warnings.warn("right padding detected in attention_mask: decoder-only models generate after the last "
                              "token of each row, so pad on the left (tokenizer.padding_side = 'left')", stacklevel=2)
        self._check_batch(b)
        eos = self._eos(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else self._pad(eos)
        warpers = self._warpers(do_sample, temperature, top_k, top_p)
        self.reset()
        if streamer is not None:
            streamer.put(input_ids.cpu())
        logits = None
        for start in range(0, t0, self.prefill_chunk):
            chunk = input_ids[:, start:start + self.prefill_chunk]
            mask = None if attention_mask is None else attention_mask[:, start:start + self.prefill_chunk]
            logits = self._run(chunk, mask)
        out = [input_ids.to(self.device)]
        finished = torch.zeros(b, dtype=torch.bool, device=self.device)
        for i in range(max_new_tokens):
            scores = logits[:, -1, :].float()
            if do_sample:
                scores = warpers(torch.cat(out, dim=1), scores)
                token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
            else:
                token = scores.argmax(dim=-1)
            if eos:
                token = torch.where(finished, torch.full_like(token, pad), token)
                finished |= torch.isin(token, torch.tensor(eos, device=self.device))
            out.append(token[:, None])
            if streamer is not None:
                streamer.put(token.cpu())
            if (eos and bool(finished.all())) or i == max_new_tokens - 1:
                break
            logits = self._run(token[:, None], None)
        if streamer is not None:
            streamer.end()
        return torch.cat(out, dim=1)

    def _run(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self._module_step(tokens) if self.info.kind == "module" else self.step(tokens, mask)

    def _eos(self, eos_token_id) -> list[int]:
        if eos_token_id is None and self.generation_config is not None:
            eos_token_id = self.generation_config.eos_token_id
        if eos_token_id is None:
            return []
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)

    def _pad(self, eos: list[int]) -> int:
        pad = getattr(self.generation_config, "pad_token_id", None) if self.generation_config is not None else None
        return pad if pad is not None else (eos[0] if eos else 0)

    @staticmethod
    def _warpers(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        warpers = LogitsProcessorList()
        if not do_sample:
            return warpers
        if temperature <= 0:
            raise KVPassError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy")
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        return warpers

    def cache_report(self) -> CacheReport:
        """Bytes of every cache buffer, bits per element and the full-precision bytes replaced, per layer."""
        dense = str(self.sites[0].dtype).replace("torch.", "") if self.sites else "float16"
        return build_report(self.method, self.layouts, dict(self.graph_module.named_buffers()), self.buffers, dense)


def _attr(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module
