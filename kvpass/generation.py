"""What the two runtimes of a compiled step share: the checks of token ids, masks, batch and room, the padding
mask and positions of each step, and ``generate()``. :class:`~kvpass.KVPassModel` runs the step in torch,
:class:`kvpass.onnx.OrtModel` in ONNX Runtime; both implement ``reset``, ``_run`` and the two hooks below."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from kvpass.errors import KVPassError


class StepLoop:
    """Token bookkeeping and generation over a step that appends to a cache of ``max_cache_len`` slots.

    Needs ``batch_size``, ``max_cache_len``, ``device``, ``config`` (its ``vocab_size``), ``generation_config``,
    ``prefill_chunk``, ``_seen`` (tokens cached) and ``_mask`` (``[batch, max_cache_len]`` padding mask).
    """

    batch_size: int
    max_cache_len: int
    prefill_chunk: int

    def reset(self) -> None:
        raise NotImplementedError

    def _run(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One call of the user-facing step: ``[B, T]`` tokens (and their mask) in, ``[B, T, vocab]`` logits out."""
        raise NotImplementedError

    def _check_generate(self, attention_mask) -> None:
        """What a runtime cannot generate from (a padding mask for a plain module)."""

    def _longer_cache_fix(self, needed: int) -> str:
        return f"compile with kvpass.compile(..., max_cache_len={needed}) or more"

    def _step_inputs(self, input_ids: torch.Tensor, new_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Record a checked chunk's padding mask and return the step's ``(input_ids, cache_position,
        attention_mask, position_ids)`` for all ``batch_size`` rows (unused rows run on dummy tokens)."""
        b, t = input_ids.shape
        start, end = self._seen, self._seen + t
        ids = torch.zeros(self.batch_size, t, dtype=torch.long, device=self.device)
        ids[:b] = input_ids.to(self.device)
        self._mask[:b, start:end] = new_mask
        self._mask[b:, start:end] = 1
        positions = self._mask[:, :end].cumsum(-1)[:, start:] - 1
        positions = positions.masked_fill(self._mask[:, start:end] == 0, 1)
        full_mask = self._mask.clone()
        full_mask[:, end:] = 1  # future slots: hidden by causality, kept 1 so no row is fully masked
        return ids, torch.arange(start, end, device=self.device), full_mask, positions

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
        self._check_generate(attention_mask)
        if t0 + max_new_tokens > self.max_cache_len:
            fix = self._longer_cache_fix(t0 + max_new_tokens)
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
