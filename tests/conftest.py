"""Shared fixtures: keep every test offline, on the CPU, and inside tmp_path."""

from __future__ import annotations

import os
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# One thread per process: the tests start many small torch processes, and on a 2-core machine two
# OpenMP threads each make them wait on one another (measured up to 20x slower under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test gets its own data root and HF cache and runs offline."""
    monkeypatch.setenv("DDPMCTL_DATA", str(tmp_path / "data-root"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    yield


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m ddpmctl ARGS` in a subprocess; the real entry point with its exit codes."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ddpmctl", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`ddpmctl ARGS` through the real main() in this process: (exit code, stdout, stderr)."""
    from ddpmctl.cli import main
    from ddpmctl.cli.common import err_console

    err = io.StringIO()
    monkeypatch.setattr(err_console, "_file", err)  # undone to None: back to the live sys.stderr
    monkeypatch.setattr(sys, "argv", ["ddpmctl", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().out, err.getvalue()


def make_images(folder: Path, n: int = 16) -> Path:
    """``n`` random 8x8 RGB PNGs (seeded, so every test gets the same data) in ``folder``."""
    from ddpmctl.images import save_png

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        save_png(folder / f"{i:02d}.png", (torch.rand(3, 8, 8, generator=g) * 255).to(torch.uint8))
    return folder


@pytest.fixture
def one_thread():
    """One intra-op thread for an in-process run (bitwise comparisons need the same thread count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomise(module):
    """``module`` with every parameter drawn from N(0, 0.1^2), seeded: a network whose output is not trivial."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.1)
    return module


# A tiny run: 0.35M parameters, 4 steps; sample grids with 2 DDIM steps keep every export fast.
TRAIN_ARGS = ["train", "shapes", "--max-steps", "4", "--batch-size", "8", "--set", "model.base_channels=16",
              "--set", "model.groups=8", "--set", "sample.sampler=ddim", "--set", "sample.eta=0",
              "--set", "sample.steps=2", "--set", "sample.grid_size=4",
              "--sample-every", "1", "--seed", "3"]
FOLDER_FILES = {"model.safetensors", "config.json", "README.md", "samples.png"}  # what `export` writes


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """runs/tiny: a real run trained by the CLI, exported once to runs/tiny/export. Read-only: copy to mutate."""
    base = tmp_path_factory.mktemp("trained")
    env = {"DDPMCTL_DATA": str(base / "data-root"), "HF_HOME": str(base / "hf-home"), "HF_HUB_OFFLINE": "1"}
    r = run_cli(*TRAIN_ARGS, "--out", "runs/tiny", cwd=base, env=env)
    assert r.returncode == 0, r.stderr
    r = run_cli("export", "runs/tiny", "--json", cwd=base, env=env)
    assert r.returncode == 0, r.stderr
    return base / "runs" / "tiny"


def copy_run(run: Path, dest: Path, with_export: bool = False) -> Path:
    """A copy of ``run`` (``trained_run``) to mutate; without its export folder unless asked."""
    shutil.copytree(run, dest, ignore=None if with_export else shutil.ignore_patterns("export"))
    return dest
