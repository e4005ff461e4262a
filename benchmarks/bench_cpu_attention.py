"""Decode attention over one layer's packed cache on the CPU, per cache spec of every method with one key and one
value spec, side by side with SDPA over the model-precision cache (what the full-precision cache runs).

Each row: microseconds per call of the op the pass emits for that spec (``kv_attention``, or
``kv_recent_attention_`` for caches with a recent window or a residual) through the CPU kernel it dispatches to (the
native kernel where built, ``docs/kernels.md``), the same call through the reference kernel, the speed of each
against SDPA on the dense fp32 cache, the bytes of the packed cache, the GB/s of it read, and the fraction of the byte limit reached: the time
reading those bytes takes at the bandwidth this machine measured in the same run (a large ``sum``), over the time
the call took. The error column is the largest absolute difference to SDPA over the dequantized cache.

Run: ``python benchmarks/bench_cpu_attention.py --out benchmarks/RESULTS.md`` (SmolLM2-135M's layer shape by default:
9 query heads, 3 KV heads, head dim 64, batch 1, one new token; keys stored before RoPE are rotated back on read).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F


def timed(fn, min_seconds: float = 0.5, min_calls: int = 5) -> float:
    """Median seconds per call, after one warm-up call."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bandwidth() -> float:
    """Bytes per second this machine reads in a large reduction (the byte limit of a decode step)."""
    x = torch.ones(64 * 2**20)  # 256 MB of fp32
    return x.numel() * 4 / timed(lambda: x.sum(), min_seconds=1.0)


def cache_specs() -> dict[str, tuple[str, str, bool]]:
    """Every distinct (key, value, keys before RoPE) of the methods with one key and one value spec."""
    from kvpass.methods import get_method, methods

    out = {}
    for name in methods():
        m = get_method(name)
        if m.family is not None or m.key == "none":
            continue
        out.setdefault((str(m.key_spec(64)), str(m.value_spec(64)), m.pre_rope_keys), name)
    return {name: key for key, name in out.items()}


def measure(kspec: str, vspec: str, pre_rope: bool, q, k, v, cos, sin) -> tuple[float, float, float | None, int]:
    """Seconds per decode call of the op a spec's method emits over a full cache of ``k``/``v`` (as dispatched, and
    through the reference kernel), its largest error against SDPA over the dequantized cache (None for the
    write-and-attend op) and the cache's bytes."""
    from kvpass.kvcache import CacheLayout, parse_cache_spec
    from kvpass.ops import cache as ops
    from kvpass.ops.meta import AttentionMeta
    from kvpass.ops.recent import kv_recent_attention_, reads_exact, recent_attention

    _, hkv, s, d = k.shape
    kl = CacheLayout.build(kspec, (1, hkv, s, d), torch.float32)
    vl = CacheLayout.build(vspec, (1, hkv, s, d), torch.float32)
    static = {"lo": -4 * torch.ones(1, hkv, 1, d), "hi": 4 * torch.ones(1, hkv, 1, d)} if kl.format.static else None
    kc, ks = kl.allocate(static=static)
    vc, vs = vl.allocate()
    ops.kv_store_(kc, ks, k[:, :, :s - 1], torch.arange(s - 1), kspec)
    ops.kv_store_(vc, vs, v[:, :, :s - 1], torch.arange(s - 1), vspec)
    pos, scale = torch.tensor([s - 1]), d**-0.5
    rope = (cos, sin) if pre_rope else (None, None)
    meta = AttentionMeta(kspec, vspec, d, d, s, scale, "half" if pre_rope else "", d if pre_rope else 0)
    if any(reads_exact(parse_cache_spec(x)) for x in (kspec, vspec)):
        t = timed(lambda: kv_recent_attention_(q, k[:, :, -1:], v[:, :, -1:], pos, kc, ks, vc, vs, None, pos, *rope,
                                               str(meta)))
        t_ref = timed(lambda: recent_attention(q, k[:, :, -1:], v[:, :, -1:], pos, kc, ks, vc, vs, None, pos, *rope,
                                               meta))
        return t, t_ref, None, kl.nbytes + vl.nbytes
    ops.kv_store_(kc, ks, k[:, :, -1:], pos, kspec)
    ops.kv_store_(vc, vs, v[:, :, -1:], pos, vspec)
    out = ops.kv_attention(q, kc, ks, vc, vs, None, pos, *rope, str(meta))[0]
    kd = ops.kv_load(kc, ks, *rope, torch.float32, str(meta.key_read))
    vd = ops.kv_load(vc, vs, None, None, torch.float32, str(meta.value_read))
    err = float((out - F.scaled_dot_product_attention(q, kd, vd, scale=scale, enable_gqa=True)).abs().max())
    t = timed(lambda: ops.kv_attention(q, kc, ks, vc, vs, None, pos, *rope, str(meta)))
    t_ref = timed(lambda: ops.reference_kv_attention(q, kc, ks, vc, vs, None, pos, *rope, meta))
    return t, t_ref, err, kl.nbytes + vl.nbytes


def main() -> None:
    import kvpass  # noqa: F401  (registers the ops)
    from kvpass.eval.output import add_results_section
    from kvpass.eval.runner import environment

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="2048,8192,32768")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--methods", help="comma-separated method names (default: every spec method)")
    p.add_argument("--out", help="put the Markdown section first in this RESULTS file")
    args = p.parse_args()
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    specs = cache_specs()
    if args.methods:
        specs = {n: specs[n] for n in args.methods.split(",")}
    from kvpass.lowering import cpu_build

    native = cpu_build.available()
    bw = bandwidth()
    g = torch.Generator().manual_seed(0)
    rows = []
    for s in [int(x) for x in args.contexts.split(",")]:
        q = torch.randn(1, hq, 1, d, generator=g)
        k, v = torch.randn(1, hkv, s, d, generator=g), torch.randn(1, hkv, s, d, generator=g)
        t_ref = timed(partial(F.scaled_dot_product_attention, q, k, v, scale=d**-0.5, enable_gqa=True))
        dense = 2 * k.numel() * 4
        rows.append((s, "full-precision cache (fp32 SDPA)", "", t_ref, t_ref, dense, dense / bw / t_ref, 0.0))
        cos = torch.randn(1, 1, s, d, generator=g).cos()
        sin = (1 - cos**2).sqrt()
        for name, (kspec, vspec, pre_rope) in specs.items():
            t, t_reference, err, nbytes = measure(kspec, vspec, pre_rope, q, k, v, cos, sin)
            cell = f"`{kspec}` / `{vspec}`".replace("|", "\\|")  # a cache option's bar would split the cell
            rows.append((s, name, cell, t, t_reference, nbytes, nbytes / bw / t, err))
            print(f"{s:>6} {name:>18}: {t * 1e6:9.0f} us  {t_ref / t:5.2f}x of fp32 SDPA (reference kernel "
                  f"{t_ref / t_reference:5.2f}x)", flush=True)
    env = environment()
    lines = [f"## CPU decode attention, one layer — {env['date']}", "",
             (f"Machine: {env['machine']}; torch {env['versions']['torch']}; measured read bandwidth "
             f"{bw / 1e9:.1f} GB/s (a 256 MB fp32 sum). One layer of {hq} query heads, {hkv} KV heads, head dim {d}, "
             "batch 1, one new token over a full cache of random data; the op each spec's method emits, as "
             f"dispatched ({'the native CPU kernels' if native else 'the reference kernels: native ones unavailable'}) "
             "and through the reference kernel "
             "(`kv_recent_attention_` where a window or residual is read exact: it also writes the token, and its "
             "error column is left empty); median of repeated calls."), "",
             "Command: `python benchmarks/bench_cpu_attention.py --out benchmarks/RESULTS.md`", "",
             ("| context | method | key / value spec | µs per call | speed vs fp32 SDPA | reference kernel µs | "
              "reference vs fp32 SDPA | cache MB | GB/s of cache read | fraction of byte limit | max abs err vs SDPA "
              "on the dequantized cache |"),
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = {row[0]: row[3] for row in rows if not row[2]}  # fp32 SDPA, the row without a spec
    for s, name, spec, t, t_reference, nbytes, frac, err in rows:
        lines.append(f"| {s:,} | {name} | {spec} | {t * 1e6:,.0f} | {base[s] / t:.2f}x | {t_reference * 1e6:,.0f} | "
                     f"{base[s] / t_reference:.2f}x | {nbytes / 2**20:.1f} | {nbytes / t / 1e9:.2f} | {frac:.1%} | "
                     f"{'' if err is None else f'{err:.1e}'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        add_results_section(args.out, text)


if __name__ == "__main__":
    main()
