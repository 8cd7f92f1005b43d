"""The package as it would be published: `python -m build` makes an sdist from a copy of the checkout
and the wheel from that sdist (so the sdist is proven to build); the wheel holds the package and its
metadata; the wheel, installed on its own (not the checkout), imports and runs. Offline: the test extra
brings `build` and setuptools, and `--no-isolation` builds with them."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import ddpmctl

pytestmark = pytest.mark.slow  # about 15 s on a 2-core CPU: build, install, three runs

CHECKOUT = Path(__file__).resolve().parents[1]
# What never goes into a build: a developer's environment, caches and earlier build outputs.
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    "runs", "out", "*.pyc")


def _run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("packaging")
    src = base / "checkout"
    shutil.copytree(CHECKOUT, src, ignore=NOT_COPIED)
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(base / "dist"), str(src), cwd=base)
    wheels, sdists = list((base / "dist").glob("*.whl")), list((base / "dist").glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    return {"wheel": wheels[0], "sdist": sdists[0], "base": base}


def test_wheel_holds_the_package_and_its_metadata(dists):
    v = ddpmctl.__version__
    whl = dists["wheel"]
    assert whl.name == f"ddpmctl-{v}-py3-none-any.whl"
    with zipfile.ZipFile(whl) as zf:
        names = set(zf.namelist())
        info = f"ddpmctl-{v}.dist-info"
        meta = email.message_from_bytes(zf.read(f"{info}/METADATA"))
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        licence = zf.read(f"{info}/licenses/LICENSE").decode()
    modules = {p.relative_to(CHECKOUT / "src").as_posix() for p in (CHECKOUT / "src" / "ddpmctl").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    tops = {n.split("/")[0] for n in names}
    assert tops == {"ddpmctl", info}, tops  # no tests/, benchmarks/, docs/, .venv/ or anything else
    assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]
    assert meta["Name"] == "ddpmctl" and meta["Version"] == v
    assert meta["License-Expression"] == "MIT" and licence == (CHECKOUT / "LICENSE").read_text()
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("torch>=") for r in requires) and any(r.startswith("typer>=") for r in requires)
    assert {"demo", "eval", "onnx"} <= set(meta.get_all("Provides-Extra"))
    assert meta.get_payload().lstrip().startswith("# ddpmctl")  # README.md is the long description
    assert "[console_scripts]\nddpmctl = ddpmctl.cli:main" in entry_points


def test_sdist_holds_what_builds_and_nothing_heavy(dists):
    v = ddpmctl.__version__
    with tarfile.open(dists["sdist"]) as tf:
        names = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    assert {"README.md", "LICENSE", "pyproject.toml", "PKG-INFO", "src/ddpmctl/__init__.py",
            "src/ddpmctl/cli/__init__.py", "src/ddpmctl/data/__init__.py"} <= names
    assert dists["sdist"].name == f"ddpmctl-{v}.tar.gz"
    # The README's figures (docs/*.png) and everything else outside the package stay out of it.
    assert not [n for n in names if n.endswith((".png", ".gif", ".npy", ".safetensors"))]
    assert not [n for n in names if n.startswith((".venv", ".git/", "build/", "dist/", "runs/"))]
    assert dists["sdist"].stat().st_size < 1_000_000


def test_installed_wheel_runs_without_the_checkout(dists, tmp_path):
    """The wheel installed into a bare folder (its dependencies come from this environment): the
    import, `python -m ddpmctl` and the `ddpmctl` script all run the installed copy."""
    target = tmp_path / "site"
    _run(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(target),
         str(dists["wheel"]))
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"}
    r = _run(sys.executable, "-c", "import ddpmctl; print(ddpmctl.__file__)", env=env, cwd=tmp_path)
    assert Path(r.stdout.strip()).resolve() == (target / "ddpmctl" / "__init__.py").resolve()
    r = _run(sys.executable, "-m", "ddpmctl", "--version", env=env, cwd=tmp_path)
    assert r.stdout.strip() == f"ddpmctl {ddpmctl.__version__}"
    # The console script pip wrote from the entry point; a dry run imports the spec, network and samplers.
    r = _run(str(target / "bin" / "ddpmctl"), "train", "shapes", "--dry-run", "--json", "--device", "cpu",
             env=env, cwd=tmp_path)
    assert '"parameters"' in r.stdout
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
