"""``KVPassModel``: the rewritten step with its packed cache, a ``generate()`` loop and ``cache_report()``."""

from __future__ import annotations

import inspect
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
        self._seen = 0
        self._mask = torch.zeros(info.batch_size, info.max_cache_len, dtype=torch.long, device=self.device)

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
            if record.role is Role.STATE:
                self.graph_module.get_buffer(record.name).zero_()

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
        b, t = input_ids.shape
        chunk = self.method.max_chunk
        if chunk and t > chunk:  # methods that choose what to keep from attention write prompts in pieces
            return torch.cat([self.step(input_ids[:, i:i + chunk], self._chunk_mask(attention_mask, b, t, i, chunk))
                              for i in range(0, t, chunk)], dim=1)
        self._check_batch(b)
        if self._seen + t > self.max_cache_len:
            raise KVPassError(
                f"context too long: {self._seen} cached + {t} new tokens = {self._seen + t} > max_cache_len="
                f"{self.max_cache_len}; compile with a larger max_cache_len (kvpass.compile(..., max_cache_len=...)) "
                "or call reset()"
            )
        start, end = self._seen, self._seen + t
        if attention_mask is None:
            new_mask = torch.ones(b, t, dtype=torch.long, device=self.device)
        else:
            attention_mask = attention_mask.to(self.device).long()
            if attention_mask.shape == (b, end):
                new_mask = attention_mask[:, start:]
            elif attention_mask.shape == (b, t):
                new_mask = attention_mask
            else:
                raise KVPassError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({b}, {t}) for the new tokens "
                    f"or ({b}, {end}) for all tokens so far"
                )
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
        logits = self.graph_module(ids, cache_position, full_mask, positions)
        self._seen = end
        return logits[:b]

    def _chunk_mask(self, mask: torch.Tensor | None, b: int, t: int, i: int, chunk: int) -> torch.Tensor | None:
        if mask is None:
            return None
        new = mask[:, -t:] if mask.shape[1] != t else mask  # the mask of the new tokens
        return new[:, i:i + chunk]

    def _check_batch(self, b: int) -> None:
        if b > self.batch_size:
            raise KVPassError(
                f"batch of {b} is larger than the compiled batch_size={self.batch_size}; compile with "
                f"kvpass.compile(..., batch_size={b}) or split the batch"
            )

    def _module_step(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if self._seen + t > self.max_cache_len:
            raise KVPassError(
                f"context too long: {self._seen} cached + {t} new tokens > max_cache_len={self.max_cache_len} "
                "(the size of the module's cache buffers); allocate larger cache buffers in the module"
            )
        positions = torch.arange(self._seen, self._seen + t, device=self.device)
        out = self.graph_module(tokens.to(self.device), positions)
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
        if input_ids.ndim != 2:
            raise KVPassError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        b, t0 = input_ids.shape
        if self.info.kind == "module" and attention_mask is not None and not bool((attention_mask != 0).all()):
            raise KVPassError("padding masks need a transformers model; this module's step takes (tokens, positions)")
        if self.info.kind == "module":
            params = list(inspect.signature(self.graph_module.forward).parameters)
            if len(params) != 2:
                raise KVPassError(
                    f"generate() needs a module called as (tokens, positions) -> logits; this one takes {params}"
                )
        if t0 + max_new_tokens > self.max_cache_len:
            raise KVPassError(
                f"prompt of {t0} tokens + max_new_tokens={max_new_tokens} = {t0 + max_new_tokens} exceeds "
                f"max_cache_len={self.max_cache_len}; compile with kvpass.compile(..., max_cache_len="
                f"{t0 + max_new_tokens}) or more, or ask for fewer tokens"
            )
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
