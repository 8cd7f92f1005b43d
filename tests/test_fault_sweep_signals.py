"""Fault-sweep cases of issue 17 §3 (signals and full disks) and §5 (resource limits).

§3: SIGTERM is handled like SIGINT by every command (cli.common.Terminated, exit 143): staged
``.OUT.partial-PID`` folders and download ``.part-PID`` files go; what a SIGKILLed writer left is
removed by the next one. A write that fails for lack of room or permission (here a real kernel
limit, RLIMIT_FSIZE, so the write gets EFBIG) is one ``error:`` line naming the path and what was
kept, exit 1, nothing half-written. §5: a spec that cannot fit the device's memory is refused
(exit 2) with the estimate and the limit, in --dry-run too; absurd widths are refused by the spec.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.server
import io
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import run_main, make_images
from ddpmctl import checkpoint as ck
from ddpmctl import spec as S
from ddpmctl.images import png_bytes
from ddpmctl.memory import device_memory, estimate
from ddpmctl.train import run

TINY = ["model.image_size=8", "model.channel_mult=1,2", "model.attention_resolutions=[4]",
        "model.base_channels=16", "model.num_res_blocks=1", "model.dropout=0.0", "model.groups=8",
        "model.head_channels=16", "model.time_embed_dim=32", "sample.grid_size=2", "sample.steps=2",
        "train.sample_every=1000", "train.log_every=1", "train.milestones=false", "train.precision=fp32"]


def _images(folder: Path, n: int = 8) -> Path:
    return make_images(folder, n)


def _tiny_spec(images: Path, steps: int, *extra: str) -> S.RunSpec:
    return S.resolve("shapes", sets=[*TINY, *extra],
                     overrides={"data": {"source": str(images)},
                                "train": {"max_steps": steps, "batch_size": 4, "checkpoint_every": 2,
                                          "device": "cpu"}})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A data folder and one tiny 2-step run (copied by tests that change it)."""
    base = tmp_path_factory.mktemp("sweep")
    images = _images(base / "images")
    data = base / "data"
    run(_tiny_spec(images, 2), base / "run", data_root=data)
    return {"base": base, "images": images, "data": data, "run": base / "run"}


def _copy_run(world, dest: Path) -> Path:
    import shutil

    shutil.copytree(world["run"], dest)
    return dest


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """A real kernel limit on the size of any file this process writes (``ulimit -f``): a write past
    it fails with EFBIG (SIGXFSZ is ignored so the write returns the error instead of killing us)."""
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_sig)


def _leftovers(root: Path) -> list[str]:
    """Staging folders, partial downloads and temporary files anywhere under root."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if ".partial-" in p.name or ".part-" in p.name or ".tmp-" in p.name)


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------ subprocesses


def _env(world) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "DDPMCTL_DATA": str(world["data"]),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("DDPMCTL_FAULT", None)
    return env


def _start(world, cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ddpmctl", *args], cwd=cwd, env=_env(world),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 120.0):
    """Poll until cond() is truthy; fail (with the process's stderr) if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}:\n{err}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _term(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_sigterm_during_sample_removes_the_staged_folder(world, tmp_path):
    """Issue 17 §3: SIGTERM during `sample` used to leave .OUT.partial-PID (SIGINT cleaned it)."""
    proc = _start(world, tmp_path, "sample", str(world["run"]), "--n", "100000", "--batch-size", "1",
                  "--sampler", "ddim", "--steps", "20", "--out", "imgs")
    _wait_for(lambda: any(tmp_path.glob(".imgs.partial-*/*.png")), proc, "the first staged image")
    rc, err = _term(proc)
    assert rc == 143, err
    assert "Traceback" not in err and "terminated" in err
    assert _leftovers(tmp_path) == [] and not (tmp_path / "imgs").exists()


def test_sigterm_during_export_removes_the_staged_folder(world, tmp_path):
    """The export draws its card's grid inside the staged folder: a long grid, SIGTERM during it."""
    run_dir = _copy_run(world, tmp_path / "run")
    spec = json.loads((run_dir / "spec.json").read_text())
    spec["sample"].update({"sampler": "ddpm", "grid_size": 256})  # 1000 steps x 256 images: seconds
    (run_dir / "spec.json").write_text(json.dumps(spec))
    proc = _start(world, tmp_path, "export", str(run_dir), "--out", "folder")
    _wait_for(lambda: any(tmp_path.glob(".folder.partial-*/config.json")), proc, "the staged config.json")
    rc, err = _term(proc)
    assert rc == 143, err
    assert "Traceback" not in err
    assert not any(tmp_path.glob(".folder.partial-*")) and not (tmp_path / "folder").exists()


def test_sigterm_stops_the_demo_server(world, tmp_path, monkeypatch, capsys):
    """`demo` serves until a signal: SIGTERM closes the server and exits 143, as Ctrl-C exits 130.
    In this process (gradio is imported once): a thread sends SIGTERM once the port answers."""
    pytest.importorskip("gradio", reason="the optional 'demo' extra is not installed")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    old = signal.getsignal(signal.SIGTERM)

    def terminate_when_serving():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with socket.socket() as c:
                if c.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        printed = getattr(sys.stdout, "getvalue", lambda: "http://")  # capsys's buffer (pytest -s: no wait)
        while time.monotonic() < deadline and "http://" not in printed():
            time.sleep(0.05)  # launch() returned and printed the URL: main() is in its serving loop
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_serving, daemon=True).start()
    try:
        code, out, err = run_main(monkeypatch, capsys, "demo", str(world["run"]), "--device", "cpu",
                                  "--port", str(port))
    finally:
        signal.signal(signal.SIGTERM, old)
    assert code == 143, err
    assert "terminated" in err and out.startswith("http://127.0.0.1:")
    with socket.socket() as s:  # the server was closed: its port is free again
        s.bind(("127.0.0.1", port))


class _Server:
    """127.0.0.1 HTTP server for one file; ``stall`` sends the first bytes and then waits."""

    def __init__(self, payload: bytes, stall: bool):
        self.payload, self.release = payload, threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                if stall:
                    self.wfile.write(outer.payload[:1_200_000])  # one 1 MB chunk reaches the .part file
                    self.wfile.flush()
                    outer.release.wait(120)
                    return
                self.wfile.write(outer.payload)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/faces.zip"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _zip_of_images(n: int = 6) -> bytes:
    buf = io.BytesIO()
    g = torch.Generator().manual_seed(1)
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for i in range(n):
            zf.writestr(f"img{i}.png", png_bytes((torch.rand(3, 16, 16, generator=g) * 255).to(torch.uint8)))
        zf.writestr("padding.bin", os.urandom(1_500_000))  # not an image: skipped; makes the file big
    return buf.getvalue()


def test_sigterm_during_download_removes_the_part_file_and_a_later_download_leaves_none(
        world, tmp_path, monkeypatch, capsys):
    """Issue 17 §3: SIGTERM during a URL download left the .part file, still there after a later
    successful download. Now SIGTERM removes it, and a SIGKILLed download's .part (a dead PID) is
    removed by the next download of the same file."""
    payload = _zip_of_images()
    sha = hashlib.sha256(payload).hexdigest()
    root = tmp_path / "root"
    server = _Server(payload, stall=True)
    try:
        proc = _start(world, tmp_path, "download", server.url, "--sha256", sha, "--root", str(root))
        _wait_for(lambda: [p for p in root.rglob("faces.zip.part-*") if p.stat().st_size > 0], proc,
                  "the first downloaded bytes")
        rc, err = _term(proc)
    finally:
        server.close()
    assert rc == 143, err
    assert "Traceback" not in err
    assert _leftovers(root) == []

    # what a SIGKILLed download would leave, next to where the file goes
    dest_dir = root / ".cache" / "url" / sha[:16]
    dest_dir.mkdir(parents=True, exist_ok=True)
    stale = dest_dir / f"faces.zip.part-{_dead_pid()}"
    stale.write_bytes(payload[:5000])
    live = dest_dir / f"faces.zip.part-{os.getppid()}"  # a running process's: not ours to remove
    live.write_bytes(b"x")
    server = _Server(payload, stall=False)
    try:
        code, out, err = run_main(monkeypatch, capsys, "download", server.url, "--sha256", sha, "--root", str(root))
    finally:
        server.close()
    assert code == 0, err
    assert not stale.exists() and live.exists()
    live.unlink()
    assert _leftovers(root) == [] and (dest_dir / "faces.zip").is_file()


def test_a_killed_samplers_staged_folder_is_removed_by_the_next_run(world, tmp_path, monkeypatch, capsys):
    stale = tmp_path / f".imgs.partial-{_dead_pid()}"
    stale.mkdir()
    (stale / "000000.png").write_bytes(b"half")
    live = tmp_path / f".imgs.partial-{os.getppid()}"  # a running process's staging: left alone
    live.mkdir()
    code, out, err = run_main(monkeypatch, capsys, "sample", str(world["run"]), "--n", "1", "--steps", "2",
                              "--out", "imgs")
    assert code == 0, err
    assert not stale.exists() and live.is_dir()
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["000000.png", "samples.json"]


# ------------------------------------------------------------------------------------------ full disks


def test_a_checkpoint_past_the_file_size_limit_names_the_intact_one(world, tmp_path, monkeypatch, capsys):
    """Issue 17 §3: disk full (or `ulimit -f`) during a checkpoint was a SafetensorError traceback."""
    run_dir = _copy_run(world, tmp_path / "run")
    model_bytes = (run_dir / ck.CKPT_DIR / "step_00000002" / "model.safetensors").stat().st_size
    assert model_bytes > 60_000  # so the limit below stops the checkpoint and nothing else
    with file_size_limit(50_000):
        code, out, err = run_main(monkeypatch, capsys, "resume", str(run_dir), "--max-steps", "4",
                                  "--data-root", str(world["data"]))
    assert code == 1, err
    line = _one_error_line(err)
    assert "could not write checkpoint step_00000004" in line and "File too large" in line
    assert "step_00000002" in line and "intact" in line
    assert ck.find_newest(run_dir).step == 2
    assert _leftovers(run_dir) == []


def test_a_checkpoint_on_a_full_disk_is_one_message(tmp_path):
    """ENOSPC at safetensors' save_file (the third-party boundary) is the same message."""
    ck.save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2)}}, {})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ck, "save_file", full)
        with pytest.raises(ck.CheckpointWriteError, match="No space left on device.*still step_00000001"):
            ck.save_checkpoint(tmp_path, 2, {"model": {"w": torch.ones(2)}}, {})
    assert (tmp_path / ck.CKPT_DIR / ck.NEWEST).read_text().strip() == "step_00000001"
    assert _leftovers(tmp_path) == []


def test_sample_images_past_the_limit_leave_nothing(world, tmp_path, monkeypatch, capsys):
    with file_size_limit(100):  # smaller than one 8x8 PNG
        code, out, err = run_main(monkeypatch, capsys, "sample", str(world["run"]), "--n", "3", "--steps", "2",
                                  "--out", "imgs")
    assert code == 1, err
    line = _one_error_line(err)
    assert "could not write imgs" in line and "File too large" in line and "as it was" in line
    assert not (tmp_path / "imgs").exists() and _leftovers(tmp_path) == []


def test_metrics_append_past_the_limit_is_rolled_back(world, tmp_path, monkeypatch, capsys):
    """A metrics record that does not fit is not half-written (no torn line to glue the next onto)."""
    run_dir = _copy_run(world, tmp_path / "run")
    spec = json.loads((run_dir / "spec.json").read_text())
    spec["train"]["max_steps"] = 4  # as `resume --max-steps 4` would, but before the limit: spec.json is larger
    (run_dir / "spec.json").write_text(json.dumps(spec))
    metrics = run_dir / "metrics.jsonl"
    before = metrics.read_bytes()
    with file_size_limit(len(before) + 20):  # room for 20 bytes of the next record, not all of it
        code, out, err = run_main(monkeypatch, capsys, "resume", str(run_dir), "--data-root", str(world["data"]))
    assert code == 1, err
    line = _one_error_line(err)
    assert f"could not write {metrics}" in line and "keeps its earlier records" in line and "step_00000002" in line
    assert metrics.read_bytes() == before


def test_eval_log_past_the_limit_keeps_the_log_whole_and_reports_the_result(world, tmp_path, monkeypatch, capsys):
    run_dir = _copy_run(world, tmp_path / "run")
    log = run_dir / "eval.jsonl"
    log.write_text(json.dumps({"earlier": "record"}) + "\n")
    before = log.read_bytes()
    with file_size_limit(len(before) + 20):
        code, out, err = run_main(monkeypatch, capsys, "eval", str(run_dir), "--metric", "bpd", "--n", "2",
                                  "--stride", "100", "--split", "train", "--data-root", str(world["data"]), "--json")
    assert code == 0, err
    assert f"could not write {log}" in err and "printed but not recorded" in err and "Traceback" not in err
    assert "bpd" in json.loads(out.strip().splitlines()[-1])["metrics"]
    assert log.read_bytes() == before


def test_prepared_data_past_the_limit_leaves_nothing(world, tmp_path, monkeypatch, capsys):
    folder = _images(tmp_path / "faces", 16)
    root = tmp_path / "root"
    with file_size_limit(20_000):  # the 16 x 3 x 64 x 64 array is 196 kB
        code, out, err = run_main(monkeypatch, capsys, "download", str(folder), "--root", str(root),
                                  "--size", "64")
    assert code == 1, err
    line = _one_error_line(err)
    assert f"could not write {root / 'faces'}" in line and "nothing was prepared" in line
    assert not (root / "faces").exists() and [p.name for p in root.iterdir() if not p.name.startswith(".cache")] == []


def test_a_download_past_the_limit_leaves_no_part_file(world, tmp_path, monkeypatch, capsys):
    payload = _zip_of_images()
    sha = hashlib.sha256(payload).hexdigest()
    root = tmp_path / "root"
    server = _Server(payload, stall=False)
    try:
        with file_size_limit(50_000):
            code, out, err = run_main(monkeypatch, capsys, "download", server.url, "--sha256", sha,
                                      "--root", str(root))
    finally:
        server.close()
    assert code == 1, err
    line = _one_error_line(err)
    assert "faces.zip" in line and "File too large" in line and "partial download was deleted" in line
    assert "connection" not in line  # not mistaken for a network failure
    assert _leftovers(root) == []


# ------------------------------------------------------------------------------------------ resource limits


def test_absurd_channel_mult_is_refused_by_the_spec(monkeypatch, capsys):
    """Issue 17 §5: channel_mult=[1,4096] with base_channels=1024 dry-ran as 1.9e15 parameters."""
    code, out, err = run_main(monkeypatch, capsys, "train", "shapes", "--dry-run", "--set",
                              "model.channel_mult=[1,4096]", "--set", "model.base_channels=1024")
    assert code == 2, err
    line = _one_error_line(err)
    assert "channel_mult" in line and "from 1 to 16" in line and "4096" in line
    assert out == ""


def test_a_model_too_big_for_the_device_is_refused_in_the_dry_run(monkeypatch, capsys):
    limit = device_memory(torch.device("cpu"))
    assert limit is not None
    sets = ["model.channel_mult=[1,16]", "model.base_channels=1024", "model.attention_resolutions=[16]"]
    spec = S.resolve("shapes", sets=sets)
    if estimate(spec).parameter_bytes <= limit[0]:
        pytest.skip(f"this machine holds {limit[0]} bytes: more than the model needs")
    code, out, err = run_main(monkeypatch, capsys, "train", "shapes", "--dry-run", "--device", "cpu",
                              *[a for s in sets for a in ("--set", s)])
    assert code == 2, err
    line = _one_error_line(err)
    assert "parameters x 20 B" in line and "the CPU has" in line and "model alone does not fit" in line
    assert out == ""


def test_a_huge_batch_is_refused_in_the_dry_run_with_the_estimate(monkeypatch, capsys):
    """Issue 17 §5: `--batch-size 65536` on the CPU ran 57 s to 8.8 GB and then a traceback."""
    code, out, err = run_main(monkeypatch, capsys, "train", "shapes", "--dry-run", "--device", "cpu",
                              "--batch-size", "65536")
    assert code == 2, err
    line = _one_error_line(err)
    assert "batch 65536 x" in line and "of activations per image" in line and "the CPU has" in line
    assert "--batch-size under" in line
    assert out == ""


def test_a_real_run_that_cannot_fit_is_refused_before_anything_is_allocated(tmp_path, monkeypatch, capsys):
    """The default preset (cifar10) at a batch of 4096 shapes images in fp32: refused after the data
    (tens of ms), before the model, and the run directory is never made."""
    spec = S.resolve("cifar10", overrides={"train": {"batch_size": 4096}})
    need = estimate(spec, precision="fp32").total_bytes
    if need <= device_memory(torch.device("cpu"))[0]:
        pytest.skip("this machine has room for it")
    code, out, err = run_main(monkeypatch, capsys, "train", "shapes", "--preset", "cifar10", "--device", "cpu",
                              "--precision", "fp32", "--batch-size", "4096", "--max-steps", "1", "--out", "runs/x")
    assert code == 2, err
    line = _one_error_line(err)
    assert "batch 4096 x" in line and "the CPU has" in line
    assert not (tmp_path / "runs" / "x").exists()


def test_every_preset_fits_a_24_gb_machine():
    """The estimate must not refuse what the presets were made for (fp32, the larger case)."""
    for name in S.PRESETS:
        est = estimate(S.resolve(name), precision="fp32")
        assert est.total_bytes < 20 * 2**30, (name, est)


def test_the_activation_estimate_matches_a_real_forward():
    """The meta-device count against the bytes a real CPU forward keeps for backward (distinct storages)."""
    spec = S.resolve("shapes", sets=TINY)
    est = estimate(spec, batch=1, precision="fp32")
    net = __import__("ddpmctl.unet", fromlist=["build"]).build(spec.model)
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    b = 4
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(torch.randn(b, 3, 8, 8), torch.zeros(b, dtype=torch.long))
    real = sum(seen.values()) / b
    assert 0.8 * real <= est.activation_bytes_per_image <= 1.25 * real, (est.activation_bytes_per_image, real)
    assert est.parameter_bytes == 20 * sum(p.numel() for p in net.parameters())


def test_sigterm_inside_a_finalizer_still_ends_the_command(tmp_path):
    """A SIGTERM whose handler runs inside a finalizer or weakref callback (where Python swallows the
    exception and prints a traceback) is raised again once the finalizer is done: the command ends
    the usual way, with no traceback."""
    script = tmp_path / "finalizer.py"
    script.write_text(
        "import os, signal\n"
        "from ddpmctl.cli.common import Terminated, handle_sigterm\n"
        "handle_sigterm()\n"
        "class A:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        for _ in range(10000):  # the handler runs in here\n"
        "            pass\n"
        "try:\n"
        "    a = A()\n"
        "    del a\n"
        "    for _ in range(10**8):\n"
        "        pass\n"
        "    print('not terminated')\n"
        "except Terminated:\n"
        "    print('terminated')\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "terminated" and "Traceback" not in r.stderr, (r.stdout, r.stderr)
