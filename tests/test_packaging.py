"""kernels/ ships as lgsae.kernels, never as a top-level `kernels` (DESIGN §3)."""

import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_kernels_under_lgsae(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("lgsae", "kernels"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(src)], check=True)
    (wheel,) = (tmp_path / "dist").glob("lgsae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = {n for n in names if n.endswith(".py")}
    assert "lgsae/kernels/__init__.py" in modules
    assert {"lgsae/__init__.py", "lgsae/sae.py", "lgsae/ops.py", "lgsae/reference.py"} <= modules
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"lgsae"}, f"unexpected top-level entries in the wheel: {top_level}"


def test_editable_install_imports_lgsae_kernels_from_kernels_dir(tmp_path):
    # run outside the repo so the source tree on sys.path cannot stand in for the install
    code = ("import lgsae.kernels, importlib.util as u; print(lgsae.kernels.__file__); "
            "s = u.find_spec('kernels'); print(s is None or 'site-packages' in s.origin)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout.split()
    assert Path(out[0]) == ROOT / "kernels" / "__init__.py"
    assert out[1] == "True", "a top-level `kernels` module from this repo is importable"


def test_public_api():
    lgsae = importlib.import_module("lgsae")
    assert lgsae.GroupSAE.__module__ == "lgsae.sae"


def test_ruff_clean():
    """ruff (E, F, I; one line length) over the whole repo, as configured in pyproject.toml."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a dev dependency: pip install -e '.[dev]'"
    out = subprocess.run([ruff, "check", "--output-format", "concise", str(ROOT)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
