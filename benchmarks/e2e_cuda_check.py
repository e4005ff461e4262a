"""On a CUDA machine: a tiny Llama compiled with int4 keys and values runs its decode attention through the fused
Triton kernel and gives the logits of the reference kernel (the same program on the CPU)."""

import sys

import torch

sys.path.insert(0, "tests")
from tiny_models import build

import kvpass

model = build("llama")
ids = torch.randint(3, 90, (2, 40), generator=torch.Generator().manual_seed(0))
cpu = kvpass.compile(model, "int4", max_cache_len=64, batch_size=2)
ref = cpu.generate(ids, max_new_tokens=12, eos_token_id=[])
ref_logits = cpu(ref[:, -1:])
gpu_model = build("llama").cuda()
gpu = kvpass.compile(gpu_model, "int4", max_cache_len=64, batch_size=2)
calls = []
import kvpass.plugins.triton_attention as ta

orig = ta.decode_attention
ta.decode_attention = lambda *a, **k: calls.append(1) or orig(*a, **k)
out = gpu.generate(ids.cuda(), max_new_tokens=12, eos_token_id=[])
logits = gpu(out[:, -1:])
print("fused kernel calls:", len(calls), "same tokens:", torch.equal(out.cpu(), ref),
      "max logit diff:", float((logits.cpu() - ref_logits).abs().max()))
