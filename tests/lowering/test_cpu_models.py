"""Whole models through the native CPU kernels against the same models through the reference kernels: every
method that reaches them (the plain ops, the exact-window op, the overlay op), a tiny Llama with GQA and left
padding, a prompt then greedy decoding: logits within 1e-4 at every step and the same tokens."""

from __future__ import annotations

import pytest
import torch
from helpers.generation import prompt
from helpers.tiny_models import build
from kvpass.lowering import cpu_build

import kvpass

pytestmark = pytest.mark.skipif(not cpu_build.available(), reason=f"native CPU kernels unavailable: {cpu_build.load()}")
CALIB_TOKENS = torch.randint(3, 96, (3000,), generator=torch.Generator().manual_seed(0))


def use_native(monkeypatch, on: bool) -> None:
    monkeypatch.setenv("KVPASS_CPU_KERNELS", "1" if on else "0")
    cpu_build.load.cache_clear()
    cpu_build.available.cache_clear()


@torch.no_grad()
def decode(qm, ids, mask, steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits of the prompt and of each greedily chosen token, and the tokens."""
    qm.reset()
    logits = [qm.step(ids, attention_mask=mask)[:, -1]]
    tokens = []
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        logits.append(qm.step(nxt, attention_mask=mask)[:, -1])
    return logits, torch.cat(tokens, 1)


@pytest.mark.parametrize("method", ["int4", "int4-c", "kivi-2bit", "kvquant-2bit-1%", "mikv", "h2o", "tq-4bit-1%", "tq-4bit-c"])
def test_native_kernels_decode_as_the_reference(method, monkeypatch):
    model = build("llama")
    cal = (kvpass.calibrate(model, [CALIB_TOKENS], method, n_samples=2, seq_len=48)
           if kvpass.get_method(method).uses_calibration else None)
    qm = kvpass.compile(model, method, max_cache_len=48, batch_size=2, calibration=cal)
    ids, mask = prompt(2)
    use_native(monkeypatch, True)
    native, native_tokens = decode(qm, ids, mask, 10)
    use_native(monkeypatch, False)
    try:
        ref, ref_tokens = decode(qm, ids, mask, 10)
    finally:
        use_native(monkeypatch, True)
    for a, b in zip(native, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(native_tokens, ref_tokens)


@pytest.mark.parametrize("method", ["kivi-2bit"])
def test_inductor_compiled_step_generates_as_eager(method):
    """``compile_step()``: the rewritten step under torch.compile (Inductor calls the native kernels as extern
    kernels) generates the eager step's tokens."""
    model = build("llama")
    qm = kvpass.compile(model, method, max_cache_len=48, batch_size=2)
    ids, mask = prompt(2)
    eager = qm.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    compiled = qm.compile_step().generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(compiled, eager)
