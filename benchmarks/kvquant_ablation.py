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
from dataclasses import dataclass

from tqdm import tqdm


@dataclass(frozen=True)
class Variant:
    keys: str
    values: str
    pre_rope: bool = True  # keys stored before RoPE
    weights: str = "fisher"  # the LUT fit's sample weights: "fisher" or "ones"
    layers: tuple[int, ...] | None = None  # the layers quantized (None: all); the others stay at model precision
    promoted: str | None = None  # layer 1's keys and values in this spec instead (what sensitive_layers would do)
    recent: int = 0  # each query's newest tokens read at model precision (cache option recent=W)


KEYS = {4: "nuq4:per_channel:static:channel_lut+outliers1%", 3: "nuq3:per_channel:static:channel_lut+outliers1%",
        2: "nuq2:per_channel:static:channel_lut:qnorm+outliers1%"}
VALUES = {4: "nuq4:per_token+outliers1%", 3: "nuq3:per_token+outliers1%", 2: "nuq2:per_token:qnorm+outliers1%"}
VARIANTS: dict[str, Variant] = {"fp16": Variant("none", "none")}
for _b in (4, 3, 2):
    VARIANTS |= {
        # the codes of the kvquant-B bit-1% presets in every layer (the presets keep their most sensitive layer in int8)
        f"{_b}: every layer": Variant(KEYS[_b], VALUES[_b]),
        f"{_b}: keys only": Variant(KEYS[_b], "none"),
        f"{_b}: values only": Variant("none", VALUES[_b]),
        f"{_b}: keys only, uniform grid": Variant(f"int{_b}:per_channel:static+outliers1%", "none"),
        f"{_b}: keys only, unweighted LUT": Variant(KEYS[_b], "none", weights="ones"),
        f"{_b}: values only, uniform grid": Variant("none", f"int{_b}:per_token+outliers1%"),
        f"{_b}: both uniform grid": Variant(f"int{_b}:per_channel:static+outliers1%", f"int{_b}:per_token+outliers1%"),
        f"{_b}: keys uniform, values LUT": Variant(f"int{_b}:per_channel:static+outliers1%", VALUES[_b]),
    }
    # where the loss comes from along the depth of the bundled model (30 layers): one block of layers coded at a time
    VARIANTS |= {f"{_b}: layers {a}-{a + 4} only": Variant(KEYS[_b], VALUES[_b], layers=tuple(range(a, a + 5)))
                 for a in range(0, 30, 5)}
VARIANTS |= {
    "4: keys only, after RoPE": Variant(KEYS[4], "none", pre_rope=False),
    "4: keys only, per token": Variant("nuq4:per_token+outliers1%", "none"),
    "2: keys only, no Q-Norm": Variant(KEYS[2].replace(":qnorm", ""), "none"),
    "2: values only, no Q-Norm": Variant("none", VALUES[2].replace(":qnorm", "")),
    "4: layer 0 only": Variant(KEYS[4], VALUES[4], layers=(0,)),
    "4: layer 1 only": Variant(KEYS[4], VALUES[4], layers=(1,)),
    "4: layer 1 only, keys": Variant(KEYS[4], "none", layers=(1,)),
    "4: layer 1 only, values": Variant("none", VALUES[4], layers=(1,)),
    "4: layer 2 only": Variant(KEYS[4], VALUES[4], layers=(2,)),
    "4: all but layer 1": Variant(KEYS[4], VALUES[4], layers=(0, *range(2, 30))),
}
# the format of the layer the -1% presets promote (layer 1 on the bundled model, chosen by calibration loss)
PROMOTED = ["int8:per_token", "int8:per_token|sink=1", "int8:per_token:g32|sink=1", "int8:per_token+outliers1%|sink=1"]
VARIANTS |= {f"4: layer 1 in {spec}": Variant(KEYS[4], VALUES[4], promoted=spec) for spec in PROMOTED}
# the recent window of the -1% presets (recent=16), with layer 1 promoted as the presets do on the bundled model
PROMOTED_SPEC = PROMOTED[-1]
for _b in (4, 3, 2):
    VARIANTS |= {f"{_b}: layer 1 promoted, recent={w}": Variant(KEYS[_b], VALUES[_b], promoted=PROMOTED_SPEC, recent=w)
                 for w in (0, 4, 8, 16, 32)}
VARIANTS |= {f"2: no outliers, recent={w}": Variant(KEYS[2].replace("+outliers1%", ""),
                                                    VALUES[2].replace("+outliers1%", ""), recent=w) for w in (0, 16)}
# static stand-ins for qaq-6x's lowest tiers (which hold nearly every token at 2.67 bits/elem): what a better floor
# would give, before or after RoPE, with a window of 32 or 64 newest tokens read at model precision (qaq-6x's window
# held 32 tokens in fp16 when these were chosen; it holds 80 in int8 with a scale each now)
FLOOR_V = "nuq2:per_channel:static:channel_lut:qnorm"
VARIANTS |= {
    "floor: qaq-6x's codes, after RoPE": Variant(KEYS[2], FLOOR_V, pre_rope=False, recent=32),
    "floor: qaq-6x's codes": Variant(KEYS[2], FLOOR_V, recent=32),
    "floor: keys without outliers": Variant(KEYS[2].replace("+outliers1%", ""), FLOOR_V, recent=32),
    "floor: values per token": Variant(KEYS[2], "nuq2:per_token:qnorm", recent=32),
    "floor: layer 1 promoted": Variant(KEYS[2], FLOOR_V, promoted=PROMOTED[-1], recent=32),
    "floor: recent=64": Variant(KEYS[2], FLOOR_V, recent=64),
    "floor: recent=64, keys without Q-Norm": Variant(KEYS[2].replace(":qnorm", ""), FLOOR_V, recent=64),
    "floor: recent=64, values without Q-Norm": Variant(KEYS[2], FLOOR_V.replace(":qnorm", ""), recent=64),
    "floor: recent=64, no Q-Norm": Variant(KEYS[2].replace(":qnorm", ""), FLOOR_V.replace(":qnorm", ""), recent=64),
}
SETS = {
    "split": ["fp16", "4: keys only", "4: values only", "4: keys only, uniform grid", "4: values only, uniform grid",
              "4: both uniform grid", "4: every layer", "3: keys only", "3: values only", "3: keys only, uniform grid",
              "3: values only, uniform grid", "3: every layer", "2: keys only", "2: values only",
              "2: keys only, no Q-Norm", "2: every layer"],
    "layers": ["fp16", *(f"2: layers {a}-{a + 4} only" for a in range(0, 30, 5)), "2: every layer",
               *(f"4: layers {a}-{a + 4} only" for a in range(0, 30, 5)), "4: layer 0 only", "4: layer 1 only",
               "4: layer 1 only, keys", "4: layer 1 only, values", "4: layer 2 only", "4: all but layer 1",
               "4: every layer"],
    "promote": ["fp16", "4: every layer", "4: all but layer 1", *(f"4: layer 1 in {spec}" for spec in PROMOTED)],
    "recent": ["fp16", *(f"2: layer 1 promoted, recent={w}" for w in (0, 4, 8, 16, 32)),
               *(f"{b}: layer 1 promoted, recent={w}" for b in (3, 4) for w in (0, 16)),
               "2: no outliers, recent=0", "2: no outliers, recent=16"],
    "floor": ["fp16", *(n for n in VARIANTS if n.startswith("floor: "))],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", dest="variants",
                   help="a variant to run, repeatable (names contain commas; default: the variants of --set)")
    p.add_argument("--set", choices=sorted(SETS), default="split",
                   help="split: keys alone / values alone at 4, 3 and 2 bits with datatype variants; layers: one block "
                        "of layers quantized at a time; promote: formats for the layer the -1%% presets promote; "
                        "recent: the window of newest tokens read at model precision")
    p.add_argument("--list", action="store_true", help="print every variant's name and specs and exit")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--out", help="add the Markdown section to this file (newest first)")
    args = p.parse_args()
    if args.list:
        for name, var in VARIANTS.items():
            print(f"{name}: {var}")
        return
    names = args.variants or SETS[args.set]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; --list names them")

    import kvpass
    from kvpass.calibration.record import record, token_samples
    from kvpass.calibration.statics import fit_recorded
    from kvpass.calibration.store import Calibration, config_hash
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
            for pre in sorted({VARIANTS[n].pre_rope for n in names})}
    layers = sorted({int(k.split(".")[0]) for k in acts[next(iter(acts))]})
    rows = []
    for name in tqdm(names, desc="variants", unit="variant"):
        var = VARIANTS[name]
        k, v, pre = var.keys, var.values, var.pre_rope
        if var.layers is not None and not set(var.layers) <= set(layers):
            raise SystemExit(f"variant {name!r} names layers {var.layers}; this model has {len(layers)}")
        opts = "|sink=1" + (f"|recent={var.recent}" if var.recent else "")
        m = MethodConfig(name, name, k + opts if k != "none" else k, v + opts if v != "none" else v,
                         pre_rope_keys=pre,
                         full_precision_layers=() if var.layers is None else tuple(set(layers) - set(var.layers)),
                         **({} if var.promoted is None else {"promoted_layers": (1,), "sensitive_spec": var.promoted}))
        cal = None
        if m.uses_calibration:
            fitted = fit_recorded(acts[pre], layers, m, fisher_weights=var.weights == "fisher")
            cal = Calibration(name, config_hash(loaded.model), fitted)
        qm = kvpass.compile(captured, m, prefill_chunk=args.context, calibration=cal)
        ppl = kvpass_perplexity(qm, wins, desc=name).perplexity
        rows.append((name, var, qm.cache_report().bits_per_element, ppl))
        tqdm.write(f"{name}: {rows[-1][2]:.2f} bits/elem, perplexity {ppl:.3f}")
    ref = next((r[3] for r in rows if r[0] == "fp16"), None)
    env = environment()
    lines = [f"## KVQuant ablation, {loaded.name} — {env['date']}", "",
             f"Machine: {env['machine']} ({env['device']}); versions: "
             + ", ".join(f"{a} {b}" for a, b in env["versions"].items()), "",
             "Command: `python benchmarks/kvquant_ablation.py"
             + ("".join(f" --variant {shlex.quote(n)}" for n in args.variants) if args.variants else f" --set {args.set}")
             + " --out ...`", "",
             (f"Perplexity over {args.windows} window(s) of {args.context} tokens (the windows of `kvpass eval`), one "
             "calibration recording (8 x 1024 tokens) for every variant; the side not named is kept at model "
             "precision (bits/elem then count it at 32), as are the layers a variant does not name."), "",
             "| variant | keys | values | layers | bits/elem | perplexity | Δ vs fp16 |",
             "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for name, var, bits, ppl in rows:
        keys = var.keys + ("" if var.pre_rope or var.keys == "none" else " (after RoPE)")
        keys += ", unweighted LUT" if var.weights == "ones" else ""
        span = "all" if var.layers is None else compact(var.layers)
        span += "" if var.promoted is None else f" (1: `{var.promoted}`)"
        delta = f"{ppl / ref - 1:+.2%}" if ref else "-"
        window = f"|recent={var.recent}" if var.recent else ""
        cells = [name, f"`{keys}{window}`", f"`{var.values}{window}`", span]
        cells = [c.replace("|", "\\|") for c in cells]  # a spec's "|sink=1" would split the table's cell
        lines.append(f"| {' | '.join(cells)} | {bits:.2f} | {ppl:.3f} | {delta} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if args.out:
        add_results_section(args.out, section)


def compact(layers: tuple[int, ...]) -> str:
    """``0, 2-29`` for (0, 2, 3, ..., 29)."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        (runs[-1].append(i) if runs and runs[-1][-1] == i - 1 else runs.append([i]))
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


if __name__ == "__main__":
    main()
