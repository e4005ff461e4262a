"""Model-level speed on the CPU: prefill tokens/s and decode ms/token of the bundled SmolLM2-135M for the
full-precision cache, every kvpass method and transformers' quanto/HQQ caches, side by side in one run, with the
ratio of each to the full-precision cache and its bits per element.

For each context and batch: a prompt of ``context`` random tokens per row is written in one prefill (timed), then
``--steps`` single tokens are decoded (timed, ms per step). kvpass methods that need calibration are calibrated once
on the bundled text (``--calibration-samples`` windows of ``--calibration-len`` tokens). Contexts past the model's
``max_position_embeddings`` are skipped and said so.

``--onnx`` also exports each method (:func:`kvpass.export_onnx`) and times the export in ONNX Runtime
(:class:`kvpass.onnx.OrtModel`, as many threads as torch), a row ``<method> [onnxruntime]`` beside the torch one.

Run: ``python benchmarks/bench_decode_model.py --out benchmarks/RESULTS.md`` (default contexts 2048 and 8184, 8k less
the decode steps; batch 1 and 4: hours with the reference kernels; ``--contexts 2048 --batches 1`` for a first look).
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time

import torch


def timed_run(prefill, step, batch: int, context: int, steps: int, vocab: int) -> tuple[float, float]:
    """(prefill tokens/s, decode ms per step) of ``prefill(ids)`` then ``steps`` calls of ``step(ids)``."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch, context), generator=g)
    start = time.perf_counter()
    prefill(prompt)
    prefill_s = time.perf_counter() - start
    new = torch.randint(0, vocab, (batch, steps), generator=g)
    start = time.perf_counter()
    for i in range(steps):
        step(new[:, i:i + 1])
    return batch * context / prefill_s, 1000 * (time.perf_counter() - start) / steps


@torch.no_grad()
def main() -> None:
    import kvpass
    from kvpass.eval.data import load_text, tokenize
    from kvpass.eval.output import add_results_section
    from kvpass.eval.peers import PEERS
    from kvpass.eval.runner import environment
    from kvpass.methods import get_method, methods
    from kvpass.models import load

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="2048,8184")  # SmolLM2 places 8192 positions: 8k less the steps
    p.add_argument("--batches", default="1,4")
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per run")
    p.add_argument("--methods", help="comma-separated kvpass methods (default: all) ")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--calibration-samples", type=int, default=4)
    p.add_argument("--calibration-len", type=int, default=512)
    p.add_argument("--onnx", action="store_true", help="also time each method's ONNX export in ONNX Runtime")
    p.add_argument("--out", help="put the Markdown section first in this RESULTS file")
    args = p.parse_args()
    exports = tempfile.TemporaryDirectory(prefix="kvpass-bench-")
    not_exported = {}
    loaded = load()
    model, vocab = loaded.model, loaded.model.config.vocab_size
    limit = model.config.max_position_embeddings
    names = args.methods.split(",") if args.methods else list(methods())
    if "fp16" in names:
        names.remove("fp16")
    names.insert(0, "fp16")  # the full-precision cache first: every ratio is to it
    peers = [] if args.no_peers else [n for n, peer in PEERS.items() if peer.installed]
    calib_ids = tokenize(loaded.tokenizer, load_text())
    calibrations = {}
    for name in names:
        if get_method(name).uses_calibration:
            calibrations[name] = kvpass.calibrate(model, [calib_ids], name, n_samples=args.calibration_samples,
                                                  seq_len=args.calibration_len)
    rows, skipped = [], []
    for context in [int(x) for x in args.contexts.split(",")]:
        if context + args.steps > limit:
            skipped.append(context)
            continue
        for batch in [int(x) for x in args.batches.split(",")]:
            captured = kvpass.capture_model(model, max_cache_len=context + args.steps, batch_size=batch)
            base = None
            for name in names:
                qm = kvpass.compile(captured, name, prefill_chunk=context, calibration=calibrations.get(name))
                qm.reset()
                pre, dec = timed_run(qm.step, qm.step, batch, context, args.steps, vocab)
                base = base or (pre, dec)
                rows.append((context, batch, name, qm.cache_report().bits_per_element, pre, dec, base))
                print(f"{context:>6} b{batch} {name:>16}: prefill {pre:8.0f} tok/s, decode {dec:8.1f} ms/token",
                      flush=True)
                if args.onnx:
                    om = exported(qm, f"{exports.name}/{name}.onnx", not_exported)
                    if om is not None:
                        pre, dec = timed_run(om.step, om.step, batch, context, args.steps, vocab)
                        rows.append((context, batch, f"{name} [onnxruntime]", om.cache_report().bits_per_element,
                                     pre, dec, base))
                        print(f"{context:>6} b{batch} {name + ' [ort]':>16}: prefill {pre:8.0f} tok/s, decode "
                              f"{dec:8.1f} ms/token", flush=True)
                        del om
                del qm
            for name in peers:
                peer, cache = PEERS[name], {}

                def prefill(ids, peer=peer, cache=cache):
                    cache["now"] = peer.make_cache(model.config)
                    return model(ids, cache=cache["now"], use_cache=True)

                def step(ids, cache=cache):
                    return model(ids, cache=cache["now"], use_cache=True)

                pre, dec = timed_run(prefill, step, batch, context, args.steps, vocab)
                rows.append((context, batch, name, peer.nominal_bits(), pre, dec, base))
                print(f"{context:>6} b{batch} {name:>16}: prefill {pre:8.0f} tok/s, decode {dec:8.1f} ms/token",
                      flush=True)
    env = environment()
    lines = [f"## Model-level CPU speed, {loaded.name} — {env['date']}", "",
             (f"Machine: {env['machine']}; versions: " + ", ".join(f"{a} {b}" for a, b in env["versions"].items())
              + f". One prefill of the whole prompt (random tokens), then {args.steps} decode steps of one token; "
              "ratios are to the full-precision cache (`fp16`: the model's own precision) in the same run, above 1 "
              "is faster. Peers' bits are nominal; their prefill attends at model precision."
              + (f" Skipped contexts past max_position_embeddings={limit}: {skipped}." if skipped else "")), "",
             f"Command: `python benchmarks/bench_decode_model.py --contexts {args.contexts} --batches {args.batches}"
             + (f" --steps {args.steps}" if args.steps != 8 else "")
             + (f" --methods {args.methods}" if args.methods else "") + (" --onnx" if args.onnx else "")
             + " --out benchmarks/RESULTS.md`", "",
             *([f"Not exported to ONNX: {', '.join(f'{k} ({v})' for k, v in not_exported.items())}.", ""]
               if not_exported else []),
             "| context | batch | method | bits/elem | prefill tok/s | prefill vs fp | decode ms/token | decode vs fp |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for context, batch, name, bits, pre, dec, (base_pre, base_dec) in rows:
        lines.append(f"| {context:,} | {batch} | {name} | {bits:.2f} | {pre:,.0f} | {pre / base_pre:.2f}x | "
                     f"{dec:,.1f} | {base_dec / dec:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        add_results_section(args.out, text)


def exported(qm, path: str, not_exported: dict):
    """``qm`` exported to ONNX and loaded in ONNX Runtime with torch's thread count, or None (and why)."""
    import onnxruntime as ort

    import kvpass
    from kvpass.onnx import OrtModel

    try:
        kvpass.export_onnx(qm, path)
    except kvpass.KVPassError as err:
        op = re.search(r"kvpass::\w+", str(err))  # the op without an ONNX lowering
        not_exported[qm.method.name] = op.group(0) if op else str(err)
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return OrtModel(path, session_options=options)


if __name__ == "__main__":
    main()
