"""The wheel installs lowering/ and plugins/ inside the kvpass namespace, never as top-level packages."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    (whl,) = out.glob("kvpass-*.whl")
    return whl


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "lowering" not in tops and "plugins" not in tops
    assert "kvpass/lowering/__init__.py" in names and "kvpass/plugins/__init__.py" in names
    assert "kvpass/plugins/cpu_attention.cpp" in names  # the native CPU kernels build from it on first use
    assert any(n.startswith("kvpass/data/sotu/") and n.endswith(".txt") for n in names)


def test_wheel_imports_in_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True)
    # torch and friends come from the test environment, appended after the fresh venv's own site-packages
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import importlib.util, kvpass, kvpass.lowering, kvpass.plugins, kvpass.ops;"
        "assert importlib.util.find_spec('lowering') is None and importlib.util.find_spec('plugins') is None;"
        "import kvpass.models; assert len(kvpass.models.bundled_texts()) == 10, kvpass.models.TEXT_DIR;"
        "from kvpass.lowering import cpu_build; assert cpu_build.SOURCE.is_file(), cpu_build.SOURCE;"
        "print(kvpass.__file__)"
    )
    res = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert str(site) in res.stdout
