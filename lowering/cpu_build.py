"""Builds and loads the native CPU kernels (``plugins/cpu_attention.cpp``) on first use.

The source is compiled once per machine with the C++ compiler torch's extension builder finds (``CXX`` or ``c++``),
for that machine's vector units (``-march=native``), into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
by default ``~/.cache/torch_extensions``); later processes load the built library. Where it cannot be built (no
compiler, no ninja) kvpass warns once, naming the cause and the fix, and the reference kernels serve every call.
``KVPASS_CPU_KERNELS=0`` turns the native kernels off (the reference kernels then run everywhere).
"""

from __future__ import annotations

import functools
import os
import subprocess
import warnings
from importlib import resources
from pathlib import Path

import torch

from kvpass.errors import KVPassError

SOURCE = Path(str(resources.files("kvpass.plugins") / "cpu_attention.cpp"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=c++17"]


def enabled() -> bool:
    """Whether the native kernels may be used (``KVPASS_CPU_KERNELS`` not set to 0)."""
    return os.environ.get("KVPASS_CPU_KERNELS", "1") != "0"


@functools.cache
def load() -> str | None:
    """Build (once) and load the kernels; returns None on success, else why they are unavailable."""
    if not enabled():
        return "turned off by KVPASS_CPU_KERNELS=0"
    try:
        from torch.utils import cpp_extension

        cpp_extension.load("kvpass_cpu", [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as exc:  # no compiler, no ninja, ...
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        warnings.warn(f"kvpass could not build its native CPU kernels ({reason}); decoding runs the reference "
                      "kernels, several times slower. Install a C++ compiler (g++) and ninja (pip install ninja), or "
                      "set KVPASS_CPU_KERNELS=0 to silence this", RuntimeWarning, stacklevel=3)
        return reason
    return None


@functools.cache
def available() -> bool:
    """Whether the native CPU kernels are built and loaded."""
    return load() is None and hasattr(torch.ops.kvpass_cpu, "attend")


def ops():
    """``torch.ops.kvpass_cpu`` once the kernels are loaded (a ``KVPassError`` saying why where they cannot be)."""
    reason = load()
    if reason is not None:
        raise KVPassError(f"the native CPU kernels are unavailable ({reason})")
    return torch.ops.kvpass_cpu
