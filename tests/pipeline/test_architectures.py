"""kvpass.compile on tiny random-weight models of every supported architecture."""

import pytest
import torch
from helpers.generation import NEW, prompt, reference
from helpers.tiny_models import ARCHS, build

import kvpass

MAX_LEN = 64


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model(arch):
    return build(arch)


@pytest.fixture(scope="module")
def fp16_model(model):
    return kvpass.compile(model, "fp16", max_cache_len=MAX_LEN, batch_size=2)


@pytest.mark.parametrize("batch", [1, 2])
def test_fp16_rewrite_is_exact(model, fp16_model, batch):
    ids, mask = prompt(batch)
    seq, ref_prefill, ref_steps = reference(model, ids, mask)
    qm = fp16_model
    qm.reset()
    logits = qm(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref_prefill[real], rtol=1e-5, atol=1e-5)
    steps = [logits[:, -1]]
    for i in range(NEW - 1):
        steps.append(qm(seq[:, ids.shape[1] + i: ids.shape[1] + i + 1])[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), ref_steps, rtol=1e-5, atol=1e-5)
    out = qm.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(out, seq)


def test_int8_tokens_and_buffers(model, arch):
    ids, mask = prompt(2)
    seq = model.generate(ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    qm = kvpass.compile(model, "int8", max_cache_len=MAX_LEN, batch_size=2)
    out = qm.generate(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=[])
    match = (out[:, ids.shape[1]:] == seq[:, ids.shape[1]:]).float().mean().item()
    assert match >= 0.9, f"{arch}: int8 greedy tokens match the fp reference on {match:.0%} of 32 steps"
    report = qm.cache_report()
    buffers = dict(qm.graph_module.named_buffers())
    codes = [b for n, b in buffers.items() if n.startswith("kvpass_cache_") and n.endswith("_codes")]
    assert codes and all(b.dtype == torch.uint8 for b in codes)
    assert report.nbytes == sum(layout.nbytes for layout in qm.layouts)
    assert report.nbytes == sum(b.numel() * b.element_size() for n, b in buffers.items() if n.startswith("kvpass_cache_"))
    full = (2, qm.sites[0].kv_heads, MAX_LEN, qm.sites[0].head_dim)
    leftovers = [n for n, b in qm.graph_module.named_buffers()
                 if b.is_floating_point() and b.ndim == 4 and b.shape[2] == MAX_LEN and b.shape[-1] >= full[-1]]
    assert not leftovers, f"full-precision cache buffers remain: {leftovers}"
