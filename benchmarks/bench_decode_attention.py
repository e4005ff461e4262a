"""Decode attention over one layer's packed cache on a CUDA GPU: every cache spec of the methods with one key and
one value spec, side by side with PyTorch SDPA over the fp16 cache (what the full-precision cache runs).

Each spec gets a row with two timings: the kernel alone (the specialised per-token int kernel for
``int2/4/8:per_token`` specs, the decode-form kernel for the rest, the reference kernel where neither takes the spec:
rotated keys stored before RoPE; fields prepared once, replayed from a CUDA graph as a compiled decode
step launches it) and the op the pass emits (``kv_attention``, or ``kv_recent_attention_`` for caches with a recent
window: it also stores the token), called from Python as eager decoding does. Speed is against fp16 SDPA timed the
same way; GB/s counts the packed cache's bytes (codes, scales, outliers, windows). A sweep of the kernels' launch
parameters at the largest shape comes first, and the fp32-arithmetic dequantization of the int kernel is timed beside
its fp16 one. The error column: largest absolute difference to fp32 SDPA over the dequantized cache.

Needs a CUDA GPU and triton. Run: ``python benchmarks/bench_decode_attention.py --out benchmarks/RESULTS.md``.
Shapes default to one Llama-3-8B layer: 32 query heads, 8 KV heads, head dim 128, one new token.
"""

from __future__ import annotations

import argparse
import itertools
import json
import traceback

import torch
import torch.nn.functional as F
from bench_cpu_attention import cache_specs


def filled(spec: str, b: int, h: int, s: int, d: int, data: torch.Tensor, chunk: int = 4096):
    """A cache of ``spec`` on ``data``'s device holding ``data`` ``[B, H, n, D]`` (calibrated ranges set to +-4)."""
    dev = data.device
    from kvpass import kvcache
    from kvpass.kvcache import CacheLayout
    from kvpass.ops.recent import ring_of, write_ring

    layout = CacheLayout.build(spec, (b, h, s, d), torch.float16)
    static = ({"lo": -4 * torch.ones(1, h, 1, d), "hi": 4 * torch.ones(1, h, 1, d)} if layout.format.static else None)
    cache, stat = layout.allocate(dev, static=static)
    n = data.shape[2]
    for i in range(0, n, chunk):  # in chunks: the reference store's temporaries scale with the tokens stored
        pos = torch.arange(i, min(i + chunk, n), device=dev)
        kvcache.store(cache, stat, data[:, :, pos], pos, layout.spec)
    if layout.spec.recent:
        write_ring(ring_of(cache, layout.spec), data, torch.arange(n, device=dev))
    return layout, cache, stat


def main() -> None:
    import triton
    from kvpass.lowering import triton as lowering
    from kvpass.plugins import triton_attention as ta
    from kvpass.plugins import triton_decode_form as form
    from triton.testing import do_bench, do_bench_cudagraph

    import kvpass  # noqa: F401  (registers the ops and their CUDA kernels)
    from kvpass.eval.output import add_results_section
    from kvpass.eval.runner import environment
    from kvpass.formats import rotation
    from kvpass.kvcache import parse_cache_spec
    from kvpass.ops import cache as ops
    from kvpass.ops.meta import AttentionMeta
    from kvpass.ops.recent import kv_recent_attention_, reads_exact

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="4096,32768")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--methods", help="comma-separated method names (default: every spec method)")
    p.add_argument("--sweep", default="int4,kvquant-4bit-1%,tq-4bit,kivi-4bit",
                   help="methods whose kernel launch parameters are swept at the largest shape ('' for none)")
    p.add_argument("--out", help="put the Markdown section first in this RESULTS file")
    p.add_argument("--json", help="write every number to this JSON file")
    p.add_argument("--smoke", action="store_true", help="run the script's logic on the CPU (TRITON_INTERPRET=1, "
                   "tiny shapes), timings meaningless")
    args = p.parse_args()
    if args.smoke:
        dev = "cpu"

        def do_bench(fn, **_):
            fn()
            return 1.0
        do_bench_cudagraph = do_bench
    elif not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (the Triton kernels are tested on the CPU by the test suite)")
    else:
        dev = "cuda"
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    specs = cache_specs()
    if args.methods:
        specs = {n: specs[n] for n in args.methods.split(",")}
    g = torch.Generator(device=dev).manual_seed(0)
    rows, sweep, failures = [], [], []
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "sweep": sweep, "failures": failures}, f, indent=2)

    for b, s in itertools.product(batches, contexts):
        q = torch.randn(b, hq, 1, d, generator=g, device=dev, dtype=torch.float16)
        kd = torch.randn(b, hkv, s, d, generator=g, device=dev, dtype=torch.float16)
        vd = torch.randn(b, hkv, s, d, generator=g, device=dev, dtype=torch.float16)
        cos = torch.randn(1, 1, s, d, generator=g, device=dev).cos()
        sin = (1 - cos**2).sqrt()
        scale = d**-0.5

        def sdpa(q=q, kd=kd, vd=vd, scale=scale):
            return F.scaled_dot_product_attention(q, kd, vd, scale=scale, enable_gqa=True)

        fp16_cg, fp16_eager = do_bench_cudagraph(sdpa, rep=100), do_bench(sdpa, warmup=25, rep=100)
        dense = 2 * kd.numel() * 2
        rows.append({"batch": b, "context": s, "method": "full-precision cache (fp16 SDPA)", "spec": "",
                     "kernel_ms": fp16_cg, "op_ms": fp16_eager, "kernel_x": 1.0, "op_x": 1.0, "MB": dense / 2**20,
                     "err": 0.0, "kernel": "SDPA"})
        print(f"b={b} s={s}: fp16 SDPA {fp16_cg * 1e3:.1f} us (graph) {fp16_eager * 1e3:.1f} us (eager)", flush=True)
        for name, (kspec, vspec, pre_rope) in specs.items():
            try:
                kl, kc, ks = filled(kspec, b, hkv, s, d, kd[:, :, :s - 1])
                vl, vc, vs = filled(vspec, b, hkv, s, d, vd[:, :, :s - 1])
                rope = (cos, sin) if pre_rope else (None, None)
                meta = AttentionMeta(kspec, vspec, d, d, s, scale, "half" if pre_rope else "", d if pre_rope else 0)
                pos = torch.tensor([s - 1], device=dev)
                window = any(reads_exact(parse_cache_spec(x)) for x in (kspec, vspec))
                if window:
                    def op(q=q, kc=kc, ks=ks, vc=vc, vs=vs, meta=meta, pos=pos, rope=rope, new=(kd, vd)):
                        return kv_recent_attention_(q, new[0][:, :, -1:], new[1][:, :, -1:], pos, kc, ks, vc, vs, None,
                                                    pos, *rope, str(meta))
                else:
                    for cache, stat, data, spec in ((kc, ks, kd, kspec), (vc, vs, vd, vspec)):
                        ops.kv_store_(cache, stat, data[:, :, -1:], pos, spec)

                    def op(q=q, kc=kc, ks=ks, vc=vc, vs=vs, meta=meta, pos=pos, rope=rope):
                        return ops.kv_attention(q, kc, ks, vc, vs, None, pos, *rope, str(meta))[0]
                out = op()
                kdq = ops.kv_load(kc, ks, *rope, torch.float32, str(meta.key_read))
                vdq = ops.kv_load(vc, vs, None, None, torch.float32, str(meta.value_read))
                exact = F.scaled_dot_product_attention(q.float(), kdq, vdq, scale=scale, enable_gqa=True)
                # (the window op reads its recent tokens exact, so it differs from the dequantized cache there)
                err = None if window else float((out.float() - exact).abs().max())
                specialised = lowering.fused_attention_applies(q, meta)
                if specialised:
                    kq, vq = (dict(zip(("codes", "scale", "zero"), c)) for c in (kc, vc))

                    def kernel(q=q, kq=kq, vq=vq, meta=meta, s=s, scale=scale, **kw):
                        return ta.decode_attention(q, kq, vq, meta.key_spec, meta.value_spec, s, None, scale, **kw)
                elif not lowering.form_attention_applies(q, meta):  # what the op then runs on CUDA
                    def kernel(q=q, kc=kc, ks=ks, vc=vc, vs=vs, rope=rope, meta=meta, **kw):
                        return ops.reference_kv_attention(q, kc, ks, vc, vs, None, None, *rope, meta)[0]
                else:  # every slot visible, as to the op's query at s - 1
                    inputs = lowering.form_inputs(q, kc, ks, vc, vs, None, None, *rope, meta,
                                                  s - 1 if window else None)

                    def kernel(inputs=inputs, **kw):
                        return form.attend(*inputs, **kw)
                mine = kernel()
                formed = not specialised and lowering.form_attention_applies(q, meta)
                if formed and meta.value_spec.format.rotate:  # the op rotates the output back
                    mine = rotation.unrotate(mine)
                kernel_err = float((mine.float() - out.float()).abs().max())  # the kernel alone vs the op
                k_ms = do_bench_cudagraph(kernel, rep=100)
                o_ms = do_bench(op, warmup=10, rep=100)
                nbytes = kl.nbytes + vl.nbytes
                rows.append({"batch": b, "context": s, "method": name, "spec": f"{kspec} / {vspec}",
                             "kernel_ms": k_ms, "op_ms": o_ms, "kernel_x": fp16_cg / k_ms, "op_x": fp16_eager / o_ms,
                             "MB": nbytes / 2**20, "err": err, "kernel_vs_op": kernel_err,
                             "kernel": "int per-token" if specialised else "decode form" if formed else "reference"})
                print(f"  {name:>16}: kernel {k_ms * 1e3:8.1f} us {fp16_cg / k_ms:5.2f}x  op {o_ms * 1e3:8.1f} us "
                      f"{fp16_eager / o_ms:5.2f}x  err {err}", flush=True)
                last = b == batches[-1] and s == contexts[-1] and name in args.sweep.split(",")
                if specialised and last:
                    for bn, nw, st, half in itertools.product((64, 128), (4, 8), (None, 4), (False, True)):
                        try:
                            ms = do_bench_cudagraph(lambda k=kernel, bn=bn, nw=nw, st=st, half=half: k(
                                block_n=bn, num_warps=nw, num_stages=st, half_math=half), rep=50)
                            sweep.append({"method": name, "block_n": bn, "num_warps": nw, "num_stages": st,
                                          "half_math": half, "ms": ms, "x": fp16_cg / ms})
                        except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory, registers)
                            sweep.append({"method": name, "block_n": bn, "num_warps": nw, "num_stages": st,
                                          "half_math": half, "error": str(e)[:200]})
                elif last and formed:
                    for bn, nw in itertools.product((32, 64, 128), (4, 8)):
                        try:
                            ms = do_bench_cudagraph(lambda k=kernel, bn=bn, nw=nw: k(block_n=bn, num_warps=nw), rep=50)
                            sweep.append({"method": name, "block_n": bn, "num_warps": nw, "ms": ms,
                                          "x": fp16_cg / ms})
                        except Exception as e:  # noqa: BLE001 - as above
                            sweep.append({"method": name, "block_n": bn, "num_warps": nw, "error": str(e)[:200]})
                del kc, vc, ks, vs
            except Exception:  # noqa: BLE001 - one spec's failure is reported, the others still measured
                failures.append({"batch": b, "context": s, "method": name, "error": traceback.format_exc()[-1500:]})
                print(f"  {name}: FAILED\n{failures[-1]['error']}", flush=True)
            save()
        torch.cuda.empty_cache()
    env = environment()
    lines = [f"## GPU decode attention, one layer — {env['date']}", "",
             (f"Device: {env['device']}; torch {env['versions']['torch']}, triton {triton.__version__}; one layer of "
              f"{hq} query heads, {hkv} KV heads, head dim {d}, one new token over a full cache of random fp16 data. "
              "Kernel: the Triton kernel alone, replayed from a CUDA graph (`do_bench_cudagraph`), against fp16 SDPA "
              "replayed the same way; op: the op the pass emits called from Python (`do_bench`; the window op also "
              "stores the token), against fp16 SDPA called the same way. Error: largest absolute difference to fp32 "
              "SDPA over the dequantized cache."), "",
             ("Command: `bash benchmarks/gpu_check.sh` (the kernel tests, then `python "
              "benchmarks/bench_decode_attention.py`)"), "",
             ("| batch | context | method | kernel | key / value spec | kernel µs | kernel vs fp16 SDPA | op µs | "
              "op vs fp16 SDPA | cache MB | GB/s of cache read (kernel) | max abs err |"),
             "| ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        spec = f"`{r['spec']}`".replace("|", "\\|") if r["spec"] else ""
        lines.append(f"| {r['batch']} | {r['context']:,} | {r['method']} | {r['kernel']} | {spec} | "
                     f"{r['kernel_ms'] * 1e3:,.1f} | {r['kernel_x']:.2f}x | {r['op_ms'] * 1e3:,.1f} | "
                     f"{r['op_x']:.2f}x | {r['MB']:.1f} | {r['MB'] * 2**20 / r['kernel_ms'] / 1e6:,.0f} | "
                     f"{'' if r['err'] is None else format(r['err'], '.1e')} |")
    if sweep:
        lines += ["", f"Launch parameters at batch {batches[-1]}, context {contexts[-1]:,} (kernel alone, CUDA graph):",
                  "", "| method | block_n | num_warps | num_stages | fp16 arithmetic | µs | vs fp16 SDPA |",
                  "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
        for r in sweep:
            t = f"{r['ms'] * 1e3:,.1f} | {r['x']:.2f}x" if "ms" in r else f"failed: {r['error'][:60]} |"
            lines.append(f"| {r['method']} | {r['block_n']} | {r['num_warps']} | {r.get('num_stages') or 'default'} | "
                         f"{r.get('half_math', '')} | {t} |")
    if failures:
        lines += ["", "Failed: " + "; ".join(f"{f['method']} (batch {f['batch']}, {f['context']:,})" for f in failures)]
    text = "\n".join(lines) + "\n"
    print(text)
    save()
    if args.out:
        add_results_section(args.out, text)


if __name__ == "__main__":
    main()
