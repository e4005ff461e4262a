"""Decode attention over one layer's cache: the fp16 cache with PyTorch SDPA (the baseline), the kvpass reference
kernel (dequantize the visible cache, then SDPA) and the fused Triton kernel, side by side at several context
lengths and batch sizes, with the error of each kvpass path against full-precision attention on the same data.

Needs a CUDA GPU and triton. Run: ``python benchmarks/bench_decode_attention.py --out benchmarks/RESULTS.md``
(appends a section). Shapes default to one Llama-3-8B layer: 32 query heads, 8 KV heads, head dim 128.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch
import torch.nn.functional as F


def main() -> None:
    import triton
    from kvpass.plugins import triton_attention as ta
    from triton.testing import do_bench, do_bench_cudagraph

    from kvpass.formats import quantize
    from kvpass.kvcache import parse_cache_spec

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--contexts", default="4096,16384,65536")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--specs", default="int8:per_token,int4:per_token:g64,int2:per_token:g64")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-n", type=int, default=128, help="tokens per block of the fused kernel")
    p.add_argument("--programs-per-sm", type=int, default=8, help="splits of the context: programs per SM")
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--out", help="append the Markdown table to this file")
    p.add_argument("--json", help="write every number to this JSON file")
    p.add_argument("--no-reference", action="store_true", help="time only fp16 and the fused kernel")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (the Triton kernel is tested on the CPU by the test suite)")
    dev, g = "cuda", torch.Generator(device="cuda").manual_seed(0)
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        for s in [int(x) for x in args.contexts.split(",")]:
            q = torch.randn(b, hq, 1, d, generator=g, device=dev, dtype=torch.float16)
            kd = torch.randn(b, hkv, s, d, generator=g, device=dev, dtype=torch.float16)
            vd = torch.randn(b, hkv, s, d, generator=g, device=dev, dtype=torch.float16)
            scale = d**-0.5

            def fp16(q=q, kd=kd, vd=vd, scale=scale):
                return F.scaled_dot_product_attention(q, kd, vd, scale=scale, enable_gqa=True)

            exact = fp16()
            t_fp16 = do_bench(fp16, warmup=25, rep=100)
            fp16_bytes = 2 * kd.numel() * 2
            rows.append({"batch": b, "context": s, "method": "fp16 cache, SDPA", "ms": t_fp16, "vs_fp16": 1.0,
                         "cache_MB": fp16_bytes / 2**20, "GB/s": fp16_bytes / t_fp16 / 1e6, "max_err": 0.0})
            for spec in args.specs.split(","):
                cs = parse_cache_spec(spec)
                kq = {n: quantize(kd, cs.format, check=False).tensors[n] for n in ("codes", "scale", "zero")}
                vq = {n: quantize(vd, cs.format, check=False).tensors[n] for n in ("codes", "scale", "zero")}
                nbytes = sum(t.numel() * t.element_size() for t in (*kq.values(), *vq.values()))

                def fused(q=q, kq=kq, vq=vq, cs=cs, s=s, scale=scale):
                    return ta.decode_attention(q, kq, vq, cs, cs, s, None, scale, block_n=args.block_n,
                                               programs_per_sm=args.programs_per_sm, num_warps=args.num_warps)

                def reference(q=q, kq=kq, vq=vq, cs=cs, s=s, scale=scale):
                    return ta.reference(q, kq, vq, cs, cs, s, None, scale)

                out_f, out_r = fused(), reference()
                paths = [("kvpass reference (dequantize + SDPA)", reference, out_r), ("kvpass fused Triton", fused, out_f)]
                for name, fn, out in paths[args.no_reference:]:
                    ms = do_bench(fn, warmup=25, rep=100)
                    rows.append({"batch": b, "context": s, "method": f"{spec}: {name}", "ms": ms, "vs_fp16": t_fp16 / ms,
                                 "cache_MB": nbytes / 2**20, "GB/s": nbytes / ms / 1e6,
                                 "max_err": float((out.float() - exact.float()).abs().max())})
                rows[-1]["fused_vs_reference_err"] = float((out_f.float() - out_r.float()).abs().max())
                # launched from a CUDA graph (as a compiled decode step is): the GPU time without Python overhead
                ms = do_bench_cudagraph(fused, rep=100)
                ms_fp16 = do_bench_cudagraph(fp16, rep=100)
                rows.append({"batch": b, "context": s, "method": f"{spec}: kvpass fused Triton, CUDA graph",
                             "ms": ms, "vs_fp16": ms_fp16 / ms, "cache_MB": nbytes / 2**20, "GB/s": nbytes / ms / 1e6,
                             "max_err": rows[-1]["max_err"], "fp16_cudagraph_ms": ms_fp16})
            torch.cuda.empty_cache()
    env = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "shape": f"{hq} query heads, {hkv} KV heads, head dim {d}, 1 new token"}
    lines = [f"## Decode attention kernel — {env['date']}", "",
             (f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}; one attention layer, "
             f"{env['shape']}; random data; times by `triton.testing.do_bench` (median ms, Python launch "
             "overhead included); the CUDA-graph rows time the fused kernel and fp16 SDPA both replayed from a CUDA "
             "graph (`do_bench_cudagraph`), their speed column is against fp16 SDPA timed the same way."), "",
             "Command: `python benchmarks/bench_decode_attention.py --out benchmarks/RESULTS.md`", "",
             "| batch | context | method | ms | speed vs fp16 | cache MB (K+V) | GB/s of cache read | max abs err vs fp16 attention |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['context']:,} | {r['method']} | {r['ms']:.3f} | {r['vs_fp16']:.2f}x | "
                     f"{r['cache_MB']:.1f} | {r['GB/s']:.0f} | {r['max_err']:.2e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
