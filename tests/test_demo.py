"""`ddpmctl demo`: the request rules, the missing-extra message, the served app driven with
gradio_client, and the page in headless Chromium.

The app is launched inside the test on 127.0.0.1 at a free port and closed at the end. Chromium is
driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``), so the browser check
needs nothing but Debian's chromium package.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import run_main
import torch

from ddpmctl import demo as D
from ddpmctl import spec as S
from ddpmctl.images import read_image

CHROMIUM = "/usr/bin/chromium"
TINY = ["model.base_channels=16", "model.groups=8", "model.head_channels=16", "model.time_embed_dim=32",
        "sample.grid_size=1", "sample.steps=1"]
LIMITS = D.Limits(max_work=200, max_images=8, queue_size=4)
# gradio's queue statistics use pandas options that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


# ---------------------------------------------------------------------------------------------
# Request rules (no gradio needed)
# ---------------------------------------------------------------------------------------------


def test_request_within_limits_and_seeds():
    req = D.make_request("ddim", 10.0, 7.0, 3.0, timesteps=1000, limits=LIMITS)
    assert req == D.Request("ddim", 10, 7, 3) and req.seeds == [7, 8, 9] and req.work == 30


def test_request_over_the_work_limit_is_refused_with_the_numbers():
    with pytest.raises(D.Refused, match=r"8 image\(s\) × 30 steps = 240 image-steps is over .* limit of 200"):
        D.make_request("ddim", 30, 0, 8, timesteps=1000, limits=LIMITS)


def test_ddpm_runs_all_T_steps_and_is_offered_only_within_the_limit():
    assert D.make_request("ddpm", 5, 0, 2, timesteps=50, limits=LIMITS).steps == 50
    assert "ddpm" in D.available_samplers(50, LIMITS) and "ddpm" not in D.available_samplers(1000, LIMITS)
    with pytest.raises(D.Refused, match="not offered"):
        D.make_request("ddpm", 5, 0, 1, timesteps=1000, limits=LIMITS)


def test_empty_seed_draws_one_and_bad_values_are_refused():
    assert 0 <= D.make_request("ddim", 5, None, 1, timesteps=1000, limits=LIMITS).seed <= D.SEED_MAX
    for steps, seed, n in [(0, 0, 1), (5, -1, 1), (5, 0, 9), (5, 0, 0)]:
        with pytest.raises(D.Refused):
            D.make_request("ddim", steps, seed, n, timesteps=1000, limits=LIMITS)


def test_reproduce_command_is_a_sample_command():
    cmd = D.reproduce_command("runs/my run", D.Request("ddim", 20, 7, 4), extra=["--no-ema"])
    assert cmd == "ddpmctl sample 'runs/my run' --sampler ddim --steps 20 --seed 7 --n 4 --no-ema --out samples/"
    assert "--steps" not in D.reproduce_command("r", D.Request("ddpm", 1000, 0, 1))


def test_class_requests_and_their_command():
    """A conditional model's page: the class by name, the guidance bounded, both in the sample command; the
    'none' entry draws unconditionally (no guidance)."""
    classes = ["circle", "square", "triangle"]
    req = D.make_request("ddim", 5, 3, 2, timesteps=1000, limits=LIMITS, cls="square", guidance=2.5, classes=classes)
    assert (req.label, req.guidance) == (1, 2.5)
    assert D.reproduce_command("r", req, classes=classes) == (
        "ddpmctl sample r --sampler ddim --steps 5 --class square --guidance 2.5 --seed 3 --n 2 --out samples/")
    plain = D.make_request("ddim", 5, 3, 2, timesteps=1000, limits=LIMITS, cls=D.ANY_CLASS, guidance=2.5,
                           classes=classes)
    assert (plain.label, plain.guidance) == (None, 0.0)
    for cls, w, message in (("hexagon", 1, "not one of this model's: circle, square, triangle"),
                            ("circle", -1, "guidance must be between 0 and"),
                            ("circle", "x", "guidance must be a number")):
        with pytest.raises(D.Refused, match=message):
            D.make_request("ddim", 5, 0, 1, timesteps=1000, limits=LIMITS, cls=cls, guidance=w, classes=classes)


def test_stream_of_a_class_is_what_generate_draws_for_it():
    from ddpmctl.generate import generate
    from ddpmctl.modelfolder import Denoiser
    from ddpmctl.unet import build
    from conftest import randomise

    spec = S.resolve("shapes", sets=[*TINY, "model.conditional=true", "model.classes=a,b"])
    den = Denoiser(randomise(build(spec.model)).eval(), spec, "mem", None, "ema")
    req = D.make_request("ddim", 3, 4, 2, timesteps=spec.diffusion.timesteps, limits=LIMITS, cls="b", guidance=2,
                         classes=["a", "b"])
    final = [f for f in D.stream(den, req, device=torch.device("cpu"), precision=None) if f.final][0]
    _, want, _ = next(generate(den, [4, 5], sampler="ddim", steps=3, device=torch.device("cpu"), labels=[1, 1],
                               guidance=2.0))
    _, other, _ = next(generate(den, [4, 5], sampler="ddim", steps=3, device=torch.device("cpu"), labels=[0, 0],
                                guidance=2.0))
    assert torch.equal(final.images, want) and not torch.equal(want, other)


def test_without_the_extra_exit_1_with_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` fails as if it were not installed
    code, out, err = run_main(monkeypatch, capsys, "demo", "no-such-run")
    assert code == 1 and out == ""
    assert "pip install '.[demo]'" in err and "pipx inject ddpmctl 'gradio>=6,<7')" in err
    assert "no-such-run" not in err  # checked before the source


# ---------------------------------------------------------------------------------------------
# The served app
# ---------------------------------------------------------------------------------------------


def need_demo_extra() -> None:
    for name in ("gradio", "gradio_client"):
        pytest.importorskip(name, reason=f"{name} is not installed (the optional 'demo' extra): {D.EXTRA_INSTALL}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny shapes run of one step: its weights are nearly random, its outputs exactly reproducible."""
    need_demo_extra()  # the run serves only the app's tests
    from ddpmctl.train import run

    base = tmp_path_factory.mktemp("demo")
    spec = S.resolve("shapes", sets=TINY, overrides={"train": {"max_steps": 1, "batch_size": 4, "device": "cpu",
                                                               "checkpoint_every": 1, "sample_every": 1000}})
    run(spec, base / "runs" / "tiny", data_root=base / "data")
    return base / "runs" / "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(run_dir):
    """(local URL, app): the demo on 127.0.0.1 at a free port, closed after the module's tests."""
    need_demo_extra()
    from ddpmctl.devices import choose_device, choose_precision
    from ddpmctl.modelfolder import load_source

    dev = choose_device("cpu")
    den = load_source(run_dir, device=dev)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(run_dir.parent / "gradio-cache"))  # gradio's file cache, not /tmp/gradio
        app = D.build_app(den, device=dev, precision=choose_precision("auto", dev), source=str(run_dir),
                          sample_args=["--device", "cpu"], limits=LIMITS)
        url = D.launch(app, host="127.0.0.1", port=_free_port())
        try:
            yield url, app
        finally:
            app.close(verbose=False)


@pytest.fixture
def client(served, tmp_path):
    from gradio_client import Client

    return Client(served[0], verbose=False, analytics_enabled=False, download_files=str(tmp_path))


def test_the_page_starts_with_the_runs_own_sampler_and_steps(served, run_dir):
    """The page opens on what `ddpmctl sample RUN` draws without options: the run's spec.sample (here the
    shapes preset's dpm-solver++, 1 step), not a demo-wide default."""
    _, app = served
    spec = S.load(run_dir / "spec.json")
    props = {c["props"].get("label"): c["props"] for c in app.config["components"] if "props" in c}
    assert (props["Sampler"]["value"], props["Steps"]["value"]) == (spec.sample.sampler, spec.sample.steps)
    assert spec.sample.sampler == "dpm-solver++"  # differs from the DDIM most demos start on


def test_served_on_loopback_only(served):
    url, app = served
    assert url.startswith("http://127.0.0.1:") and app.server_name == "127.0.0.1"


def test_generate_streams_x0_then_final_images_that_ddpmctl_sample_reproduces(client, run_dir, tmp_path,
                                                                            monkeypatch, capsys):
    job = client.submit("ddim", 6, 11, 3, api_name="/generate")
    gallery, status, seed = job.result(timeout=120)
    frames = job.outputs()
    assert seed == 11 and "**Done:**" in status and "seeds 11–13" in status
    assert len(frames) >= 3  # previews of x̂_0 (every ceil(6/10) = 1 step but the last), then the final
    assert all(len(g) == 3 for g, _, _ in frames)
    assert [item["caption"] for item in gallery] == ["seed 11", "seed 12", "seed 13"]
    shown = [read_image(Path(item["image"])) for item in gallery]
    assert all(img.shape == (3, 32, 32) for img in shown)

    cmd = f"ddpmctl sample {run_dir} --sampler ddim --steps 6 --seed 11 --n 3 --device cpu --out samples/"
    assert cmd in status
    code, _, err = run_main(monkeypatch, capsys, *cmd.split()[1:-2], "--out", str(tmp_path / "cli"))
    assert code == 0, err
    for i, img in enumerate(shown):
        assert torch.equal(img, read_image(tmp_path / "cli" / f"{i:06d}.png")), f"image {i} differs"
    assert [f[1].split(":")[0] for f in frames[:-1]] == [f"Step {k}/6" for k in range(1, len(frames))]
    assert read_image(Path(frames[0][0][0]["image"])).shape == (3, 32, 32)


def test_request_over_the_work_limit_is_refused_on_the_page(client):
    gallery, status, _ = client.predict("ddim", 100, 0, 8, api_name="/generate")
    assert gallery == [] and status.startswith("**Refused:**") and "limit of 200" in status
    gallery, status, _ = client.predict("dpm-solver++", 3, 5, 1, api_name="/generate")  # still serving
    assert len(gallery) == 1 and "**Done:**" in status


# ---------------------------------------------------------------------------------------------
# The page in headless Chromium
# ---------------------------------------------------------------------------------------------


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4, NUL-separated JSON)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", "--hide-scrollbars"]

    def __init__(self, exe: str = CHROMIUM, size: tuple[int, int] = (1280, 720)):
        self.profile = tempfile.mkdtemp(prefix="ddpmctl-chromium-")
        cmd_r, self._w = os.pipe()
        self._r, out_w = os.pipe()

        def to_fds_3_4():
            os.dup2(cmd_r, 3)
            os.dup2(out_w, 4)

        self.proc = subprocess.Popen([exe, *self.FLAGS, f"--window-size={size[0]},{size[1]}",
                                      f"--user-data-dir={self.profile}", "about:blank"],
                                     pass_fds=(3, 4), preexec_fn=to_fds_3_4,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._buf, self._id = b"", 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError(f"{method}: no reply in {timeout}s")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"waited {timeout}s for {expression}")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", self.session, format="png")["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
        shutil.rmtree(self.profile, ignore_errors=True)


GALLERY_DONE = f"""(() => {{
  const imgs = [...document.querySelectorAll('#{D.GALLERY_ID} img')];
  const done = (document.querySelector('#{D.STATUS_ID}')?.innerText || '').includes('Done');
  return done && imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)
    ? imgs.map(i => [i.naturalWidth, i.naturalHeight]) : null;
}})()"""


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
def test_page_in_headless_chromium_shows_images_after_generate(served, tmp_path):
    url, _ = served
    browser = Chromium()
    try:
        browser.call("Page.navigate", browser.session, url=url)
        browser.wait_for(f"!!document.querySelector('#{D.GENERATE_ID}')")
        assert browser.js(f"document.querySelectorAll('#{D.GALLERY_ID} img').length") == 0
        browser.js(f"document.querySelector('#{D.GENERATE_ID}').click()")
        sizes = browser.wait_for(GALLERY_DONE)
        assert len(sizes) == 4 and all(s == [32, 32] for s in sizes)  # the default: 4 images
        status = browser.js(f"document.querySelector('#{D.STATUS_ID}').innerText")
        assert "ddpmctl sample" in status and "--seed 0 --n 4" in status
        browser.screenshot(tmp_path / "demo.png")
    finally:
        browser.close()
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
