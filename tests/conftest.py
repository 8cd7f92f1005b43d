"""Shared fixtures: keep every test offline, on the CPU, and inside tmp_path."""

from __future__ import annotations

import os
import io
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
