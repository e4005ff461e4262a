"""`kvpass eval`: every method on one model and text, side by side, in one run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from rich.console import Console
from tqdm import tqdm

import kvpass
from kvpass.errors import KVPassError, is_int
from kvpass.eval import passkey
from kvpass.eval.data import adds_bos, load_text, tokenize, windows
from kvpass.eval.measure import PeakMemory, decode_tokens_per_s
from kvpass.eval.peers import PEERS
from kvpass.eval.perplexity import kvpass_perplexity, quantized_cache_perplexity
from kvpass.methods import get_method
from kvpass.models import LoadedModel, load
from kvpass.pipeline.capture import head_shapes

REFERENCE = "fp16"


@dataclass
class EvalConfig:
    model: str = "smollm2"
    gguf_file: str | None = None
    text: list[str] | None = None
    dataset: str | None = None
    methods: list[str] = field(default_factory=lambda: ["fp16", "int8", "fp8", "int4", "int2", "kivi-4bit", "kivi-2bit",
                                                        "kvquant-4bit", "kvquant-3bit", "kvquant-2bit",
                                                        "kvquant-4bit-1%", "kvquant-3bit-1%", "kvquant-2bit-1%",
                                                        "qaq", "qaq-6x", "mikv", "h2o", "streaming"])
    context: int = 2048
    windows: int | None = 4
    passkey_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    haystacks: list[str] = field(default_factory=lambda: ["synthetic", "text"])
    passkey_trials: int = 1  # prompts per cell (another key and, in real text, another stretch of it)
    passkey_new_tokens: int = 8
    decode_steps: int = 16
    calibration_samples: int = 16
    calibration_len: int = 2048
    memory_budget_gb: float = 1.0
    peers: list[str] | None = None  # peers added when installed (None: all); --methods may name others
    onnx: bool = False  # also measure each method's ONNX export in ONNX Runtime (a row "<method> [onnxruntime]")


QUICK = {"methods": ["fp16", "int4", "int2", "kivi-2bit", "kvquant-2bit-1%"], "context": 512, "windows": 1,
         "passkey_lengths": [1024], "passkey_depths": [0.5], "decode_steps": 8, "calibration_samples": 4,
         "calibration_len": 512, "peers": ["hf-quanto-int4", "hf-quanto-int2"]}


@dataclass
class Record:
    method: str
    kind: str  # "kvpass", "kvpass-onnx" (the exported model in ONNX Runtime) or "peer"
    description: str
    perplexity: float | None = None
    perplexity_rel_change: float | None = None
    bits_per_element: float | None = None
    bits_measured: bool = True
    cache_bytes: int | None = None
    dense_fp16_bytes: int | None = None
    max_context_in_budget: int | None = None
    passkey_accuracy: float | None = None
    passkey_synthetic: float | None = None
    passkey_text: float | None = None
    passkey_cells: list[dict] = field(default_factory=list)
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    seconds: float | None = None
    error: str | None = None  # the method failed; the run went on without it


def validate_methods(names: list[str]) -> None:
    for name in names:
        if name in PEERS:
            PEERS[name].require()
        else:
            try:
                get_method(name)
            except KVPassError as err:
                raise KVPassError(f"{err}; peers: {', '.join(PEERS)}") from None


def passkey_cells(cfg: EvalConfig, tokenizer, haystack_text: str, max_len: int) -> list[passkey.PasskeyPrompt]:
    cells = []
    lengths = [n for n in cfg.passkey_lengths if n + cfg.passkey_new_tokens <= max_len]
    secrets = iter(passkey.keys(len(lengths) * len(cfg.passkey_depths) * len(cfg.haystacks) * cfg.passkey_trials))
    for length in lengths:
        for depth in cfg.passkey_depths:
            for hay in cfg.haystacks:
                for trial in range(cfg.passkey_trials):
                    cells.append(passkey.make_prompt(tokenizer, length, depth, next(secrets), hay, haystack_text,
                                                     offset=trial * length))
    return cells


def run_passkey(name: str, cells: list[passkey.PasskeyPrompt], tokenizer, generate) -> list[dict]:
    """Ask every prompt with ``generate(ids) -> ids`` and score the answers."""
    out = []
    for cell in tqdm(cells, desc=f"{name}: passkey", unit="prompt", leave=False):
        tokens = generate(cell.ids)
        answer = tokenizer.decode(tokens[0, cell.ids.shape[1]:], skip_special_tokens=True)
        out.append({"length": cell.ids.shape[1], "depth": cell.depth, "haystack": cell.haystack, "key": cell.key,
                    "answer": answer.strip(), "correct": passkey.score(answer, cell.key)})
    return out


def summarise_passkey(rec: Record) -> None:
    for hay in ("synthetic", "text"):
        hits = [c["correct"] for c in rec.passkey_cells if c["haystack"] == hay]
        setattr(rec, f"passkey_{hay}", sum(hits) / len(hits) if hits else None)
    all_hits = [c["correct"] for c in rec.passkey_cells]
    rec.passkey_accuracy = sum(all_hits) / len(all_hits) if all_hits else None


def passkey_cache_lengths(cfg: EvalConfig, cells: list[passkey.PasskeyPrompt]) -> dict[int, int]:
    """The cache length of each passkey length: its longest prompt plus the answer. Perplexity and speed run on a
    cache of ``cfg.context`` slots. Each run gets a cache of its own length because budgets are fractions of the
    cache (an eviction method keeping 51% of a 4k cache would keep every token of a 2k window)."""
    need: dict[int, int] = {}
    for c in cells:
        need[c.length] = max(need.get(c.length, 0), c.ids.shape[1] + cfg.passkey_new_tokens)
    return need


ONNX_SUFFIX = " [onnxruntime]"


def row(name: str, backend: str) -> tuple[str, str]:
    """The method column and kind of a kvpass method's record on ``backend`` ("torch" or "onnxruntime")."""
    return (name + ONNX_SUFFIX, "kvpass-onnx") if backend == "onnxruntime" else (name, "kvpass")


def run_kvpass(name, captured, passkey_len, cfg, wins, cells, tokenizer, vocab, budget, model, calib_ids,
               backend: str = "torch", calibrations: dict | None = None) -> Record:
    """One kvpass method; ``captured`` maps a cache length to the model captured with it, ``passkey_len`` a passkey
    length to its cache length (:func:`passkey_cache_lengths`). ``backend="onnxruntime"`` measures each compiled
    model's ONNX export (:func:`kvpass.export_onnx`) through :class:`kvpass.onnx.OrtModel` instead; ``calibrations``
    shares one calibration per method between the backends."""
    import tempfile

    method = get_method(name)
    onnx = backend == "onnxruntime"
    rec = Record(*row(name, backend), method.description)
    start = time.perf_counter()
    calibrations = {} if calibrations is None else calibrations
    calibration = calibrations.get(name)
    if method.uses_calibration:
        # calibrated on the second half of the text; perplexity windows come from the first half
        if calibration is None:
            calibration = calibrations[name] = kvpass.calibrate(
                model, [calib_ids], method, n_samples=cfg.calibration_samples,
                seq_len=min(cfg.calibration_len, len(calib_ids)))
        rec.description += f" [calibrated: {cfg.calibration_samples} x {cfg.calibration_len} tokens]"
        check = calibration.meta.get("check")
        if check and check["bound"] is not None:
            rec.description += (f" [calibration-set perplexity {100 * check['loss']:+.2f}%, bound "
                                f"+{100 * check['bound']:g}%{': PAST IT' if not check['loss'] <= check['bound'] else ''}]")
        if calibration.promoted_layers:
            rec.description += (f" [layers {', '.join(map(str, calibration.promoted_layers))} in "
                                f"{method.sensitive_spec}, chosen by calibration loss]")
    exports = tempfile.TemporaryDirectory(prefix="kvpass-eval-") if onnx else None
    with PeakMemory() as mem:
        compiled = {}

        def compiled_for(n: int):
            if n not in compiled:
                qm = kvpass.compile(captured[n], method, prefill_chunk=n, calibration=calibration)
                if onnx:
                    from kvpass.onnx import OrtModel

                    qm = OrtModel(kvpass.export_onnx(qm, f"{exports.name}/{n}.onnx"))
                compiled[n] = qm
            return compiled[n]

        qm = compiled_for(cfg.context)
        ppl = kvpass_perplexity(qm, wins, desc=f"{name}: perplexity")
        for length in dict.fromkeys(c.length for c in cells):
            pk = compiled_for(passkey_len[length])
            rec.passkey_cells += run_passkey(
                name, [c for c in cells if c.length == length], tokenizer,
                lambda ids, pk=pk: pk.generate(ids, max_new_tokens=cfg.passkey_new_tokens, eos_token_id=[]))
            if pk is not qm:
                del compiled[passkey_len[length]]  # one passkey cache at a time
        rec.decode_tokens_per_s = decode_tokens_per_s(qm, min(cfg.context, qm.max_cache_len - cfg.decode_steps),
                                                      cfg.decode_steps, vocab, reset=qm.reset)
    if exports is not None:
        exports.cleanup()
    report = qm.cache_report()
    elements = sum(layer.elements for layer in report.layers)
    per_token = report.nbytes / (qm.batch_size * qm.max_cache_len)
    rec.perplexity, rec.prefill_tokens_per_s = ppl.perplexity, ppl.tokens_per_s
    rec.bits_per_element, rec.cache_bytes = report.bits_per_element, report.nbytes
    rec.dense_fp16_bytes = elements * 2
    rec.max_context_in_budget = int(budget / per_token)
    rec.peak_memory_bytes, rec.seconds = mem.peak, time.perf_counter() - start
    summarise_passkey(rec)
    return rec


@torch.no_grad()
def run_peer(name, model, cfg, wins, cells, tokenizer, vocab, budget) -> Record:
    peer = PEERS[name]
    rec = Record(name, "peer", f"transformers QuantizedCache, {peer.backend} int{peer.nbits}, group 64, "
                               "last 128 tokens at model precision")
    start = time.perf_counter()
    with PeakMemory() as mem:
        ppl = quantized_cache_perplexity(model, wins, lambda: peer.make_cache(model.config), desc=f"{name}: perplexity")
        rec.passkey_cells = run_passkey(
            name, cells, tokenizer,
            lambda ids: model.generate(ids, max_new_tokens=cfg.passkey_new_tokens, do_sample=False,
                                       cache=peer.make_cache(model.config)))
        cache = {}  # decode measured as for kvpass: batch 1, single-token steps after a context-long prompt

        def reset():
            cache["now"] = peer.make_cache(model.config)

        def step(ids):
            return model(ids.to(model.device), cache=cache["now"], use_cache=True)

        rec.decode_tokens_per_s = decode_tokens_per_s(step, cfg.context, cfg.decode_steps, vocab, reset=reset)
    rec.perplexity = ppl.perplexity
    rec.bits_per_element, rec.bits_measured = peer.nominal_bits(), False
    cfg_text = model.config.get_text_config()
    kv_heads, head_dim = head_shapes(cfg_text)
    per_token = 2 * cfg_text.num_hidden_layers * kv_heads * head_dim * rec.bits_per_element / 8
    rec.max_context_in_budget = int(budget / per_token)
    rec.peak_memory_bytes, rec.seconds = mem.peak, time.perf_counter() - start
    summarise_passkey(rec)
    return rec


def check_numbers(cfg: EvalConfig) -> None:
    """Every count and fraction of ``cfg`` in its range, named by its command-line flag."""
    least = {"context": 4, "windows": 1, "passkey_trials": 1, "calibration_samples": 1, "calibration_len": 2}
    for name, low in least.items():
        value = getattr(cfg, name)
        if not is_int(value) or value < low:
            raise KVPassError(f"--{name.replace('_', '-')} must be at least {low}, got {value!r}")
    if not cfg.passkey_lengths or min(cfg.passkey_lengths) < 2:
        raise KVPassError(f"--passkey-lengths must be prompt lengths of at least 2 tokens, got {cfg.passkey_lengths}")
    if not cfg.passkey_depths or not all(0.0 <= d <= 1.0 for d in cfg.passkey_depths):
        raise KVPassError(f"--passkey-depths are fractions of the prompt, each in [0, 1], got {cfg.passkey_depths}")
    if not cfg.memory_budget_gb > 0:
        raise KVPassError(f"--memory-budget-gb must be > 0, got {cfg.memory_budget_gb}")


def run(cfg: EvalConfig, console: Console | None = None, loaded: LoadedModel | None = None,
        on_method: Callable[[dict], None] | None = None) -> dict:
    """Run every method of ``cfg``; returns the JSON-ready result (records plus machine, versions and date).
    ``on_method`` gets the result so far (``"complete": False``) after each method, so that a long run killed
    half-way keeps what it measured."""
    console = console or Console()
    names = list(dict.fromkeys(cfg.methods))
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
    wanted = list(PEERS) if cfg.peers is None else cfg.peers
    names += [p for p in wanted if PEERS[p].installed and p not in names]
    validate_methods(names)
    check_numbers(cfg)
    loaded = loaded or load(cfg.model, cfg.gguf_file)
    model, tokenizer = loaded.model, loaded.tokenizer
    text = load_text(cfg.text, cfg.dataset)
    ids = tokenize(tokenizer, text)
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    half = len(ids) // 2
    wins = windows(ids[:half], cfg.context, cfg.windows, bos)
    max_len = max([cfg.context] + [n + cfg.passkey_new_tokens for n in cfg.passkey_lengths])
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit and max_len > limit:
        raise KVPassError(f"context {max_len} exceeds the model's max_position_embeddings={limit}; lower --context "
                          "or --passkey-lengths")
    cells = passkey_cells(cfg, tokenizer, text, max_len)
    vocab = model.config.get_text_config().vocab_size
    budget = cfg.memory_budget_gb * 2**30
    console.print(f"[bold]kvpass eval[/]: {loaded.name}, {len(wins)} window(s) of {cfg.context} tokens, "
                  f"{len(cells)} passkey prompts, methods: {', '.join(names)}")
    start = time.perf_counter()
    passkey_len = passkey_cache_lengths(cfg, cells)
    captured = {n: kvpass.capture_model(model, max_cache_len=n, batch_size=1)
                for n in sorted({cfg.context, *passkey_len.values()})}
    console.print(f"captured the model with caches of {', '.join(map(str, captured))} tokens in "
                  f"{time.perf_counter() - start:.0f} s")
    records, calibrations = [], {}
    runs = [(n, b) for n in names for b in (("torch", "onnxruntime") if cfg.onnx and n not in PEERS else ("torch",))]
    for name, backend in tqdm(runs, desc="methods", unit="method"):
        try:
            if name in PEERS:
                records.append(run_peer(name, model, cfg, wins, cells, tokenizer, vocab, budget))
            else:
                records.append(run_kvpass(name, captured, passkey_len, cfg, wins, cells, tokenizer, vocab, budget, model,
                                          ids[half:], backend, calibrations))
        except Exception as err:  # one broken method (often a peer library) must not lose the others' hour
            if name == REFERENCE and backend == "torch":
                raise
            label, kind = (name, "peer") if name in PEERS else row(name, backend)
            records.append(Record(label, kind, "failed", error=f"{type(err).__name__}: {err}"))
            console.print(f"[bold red]{label} failed[/]: {type(err).__name__}: {err}")
        if on_method is not None:
            on_method(result(loaded.name, cfg, wins, records, complete=len(records) == len(runs)))
    return result(loaded.name, cfg, wins, records, complete=True)


def result(model_name: str, cfg: EvalConfig, wins: list, records: list[Record], complete: bool) -> dict:
    """The JSON-ready result of ``records``, with each perplexity's change against the reference."""
    ref = next((r for r in records if r.method == REFERENCE), None)
    for r in records:
        if r.perplexity is not None and ref is not None:
            r.perplexity_rel_change = r.perplexity / ref.perplexity - 1.0
    return {
        "model": model_name,
        "context": cfg.context,
        "windows": len(wins),
        "tokens_scored": sum(len(w) - 1 for w in wins),
        "complete": complete,
        "config": asdict(cfg),
        "records": [asdict(r) for r in records],
        **environment(),
    }


def environment() -> dict:
    import datetime
    import platform

    import transformers

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads, "
                   f"{platform.system()} {platform.release()}",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {"kvpass": kvpass.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
