"""`download`: URLs served from 127.0.0.1, the Hub stubbed at huggingface_hub's functions, torchvision's
MNIST format from files on disk. No test touches the internet."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmctl.data import download, list_prepared, load_images
from ddpmctl.errors import DataError, DataNotFoundError, NetworkError, UsageError


# ----------------------------------------------------------------------------- fixtures


class _Server:
    """Serves ``directory``. ``gate``: send the headers, then hold the body until the event is set.
    ``send_length=False``: no Content-Length (the body ends when the connection closes, as HTTP/1.0 allows)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.requests: list[str] = []
        self.gate: threading.Event | None = None
        self.send_length = True
        self.body_sent = threading.Event()
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(directory), **kw)

            def do_GET(self):
                outer.requests.append(self.path)
                f = outer.dir / self.path.lstrip("/")
                if (outer.gate is None and outer.send_length) or not f.is_file():
                    return super().do_GET()
                body = f.read_bytes()
                self.send_response(200)
                if outer.send_length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.flush()
                if outer.gate is not None and not outer.gate.wait(120):
                    return
                self.wfile.write(body)
                outer.body_sent.set()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    d = tmp_path / "served"
    d.mkdir()
    s = _Server(d)
    yield s
    s.close()


def _png(rgb, size=20) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), rgb, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path: Path, n=6) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            zf.writestr(f"faces/{i:03d}.png", _png((40 * i % 256, 100, 200)))
        zf.writestr("faces/LICENSE.txt", "CC0")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "data-root"


# ----------------------------------------------------------------------------- https (served over http on 127.0.0.1)


def test_url_archive_downloaded_verified_prepared(server, root):
    sha = _zip(server.dir / "faces.zip")
    events = []
    res = download(f"{server.url}/faces.zip", sha256=sha, name="faces", size=16, root=root, on_event=events.append)
    assert not res.already_prepared and res.name == "faces"
    info = json.loads((root / "faces" / "dataset.json").read_text())
    assert info["source"] == f"{server.url}/faces.zip" and info["request"]["sha256"] == sha
    assert info["counts"] == {"train": 6} and info["size"] == 16 and info["channels"] == 3
    assert info["skipped"]["train"]["not an image file"]["count"] == 1
    fname = info["files"]["train"]
    assert info["sha256"][fname] == hashlib.sha256((root / "faces" / fname).read_bytes()).hexdigest()
    assert {"format", "ddpmctl_version", "preprocessing", "licence", "created"} <= set(info)
    stages = {e.get("stage") for e in events if e["event"] == "progress"}
    assert {"download", "prepare"} <= stages
    data = load_images("faces", image_size=16, channels=3, root=root)
    assert data.images.shape == (6, 3, 16, 16)
    # The same URL is also found by address.
    assert load_images(f"{server.url}/faces.zip", image_size=16, channels=3, root=root).images.shape[0] == 6


def test_second_download_does_nothing_and_keeps_files(server, root):
    sha = _zip(server.dir / "faces.zip")
    url = f"{server.url}/faces.zip"
    first = download(url, sha256=sha, name="faces", size=16, root=root)
    files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.path.iterdir()}
    assert len(server.requests) == 1
    events = []
    again = download(url, sha256=sha, name="faces", size=16, root=root, on_event=events.append)
    assert again.already_prepared and again.path == first.path
    assert len(server.requests) == 1  # no network at all
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in again.path.iterdir()} == files
    assert any("already prepared" in e.get("message", "") for e in events)


def test_bad_checksum_removes_file_and_prepares_nothing(server, root):
    _zip(server.dir / "faces.zip")
    wrong = "0" * 64
    with pytest.raises(DataError) as exc:
        download(f"{server.url}/faces.zip", sha256=wrong, name="faces", root=root)
    msg = str(exc.value)
    actual = hashlib.sha256((server.dir / "faces.zip").read_bytes()).hexdigest()
    assert "faces.zip" in msg and wrong in msg and actual in msg
    leftovers = [p for p in root.rglob("*") if p.is_file()]
    assert leftovers == []  # neither the download, nor its .part, nor a dataset
    assert list_prepared(root) == []


def test_url_download_states_its_size_before_the_data(server, root):
    """The size comes from the server's Content-Length, in a `download` event sent before any byte is
    read; without a Content-Length the event says the size is not known instead of guessing."""
    from ddpmctl.units import human_bytes

    sha = _zip(server.dir / "faces.zip")
    nbytes = (server.dir / "faces.zip").stat().st_size
    events = []
    download(f"{server.url}/faces.zip", sha256=sha, name="faces", size=8, root=root, on_event=events.append)
    sized = [i for i, e in enumerate(events) if e["event"] == "download"]
    received = [i for i, e in enumerate(events) if e["event"] == "progress" and e["stage"] == "download" and e["done"]]
    assert len(sized) == 1 and received and sized[0] < received[0]
    ev = events[sized[0]]
    assert ev["bytes"] == nbytes
    assert ev["message"] == f"downloading faces.zip: {human_bytes(nbytes)} from {server.url}/faces.zip"

    server.send_length = False
    events.clear()
    res = download(f"{server.url}/faces.zip", sha256=sha, name="faces2", size=8, root=root, force=True,
                   on_event=events.append)
    assert res.info["counts"] == {"train": 6}  # the cached file: no second request, no size line
    assert len(server.requests) == 1 and not [e for e in events if e["event"] == "download"]
    (server.dir / "other.zip").write_bytes((server.dir / "faces.zip").read_bytes())
    download(f"{server.url}/other.zip", sha256=sha, size=8, root=root, on_event=events.append)
    ev = next(e for e in events if e["event"] == "download")
    assert ev["bytes"] is None and "did not give its size" in ev["message"]


@pytest.mark.parametrize("command", ["download", "train"])
def test_cli_prints_the_size_before_the_data_arrives(server, root, tmp_path, command):
    """`download URL` and `train URL#sha256=...` (not prepared yet) print the size line on stderr while
    the server still holds the body back: the line comes before the data, not after it."""
    from ddpmctl.units import human_bytes

    sha = _zip(server.dir / "faces.zip")
    nbytes = (server.dir / "faces.zip").stat().st_size
    server.gate = threading.Event()
    url = f"{server.url}/faces.zip"
    args = (["download", url, "--sha256", sha, "--size", "8"] if command == "download" else
            ["train", f"{url}#sha256={sha}", "--preset", "shapes", "--max-steps", "1", "--batch-size", "4",
             "--set", "model.base_channels=16", "--set", "model.groups=8", "--set", "sample.sampler=ddim",
             "--set", "sample.steps=2", "--set", "sample.grid_size=4", "--out", str(tmp_path / "run")])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DDPMCTL_DATA": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "ddpmctl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    lines = []
    try:
        timer = threading.Timer(60, proc.kill)  # a hung run fails the test instead of hanging it
        timer.start()
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("downloading faces.zip"):
                break
        assert not server.body_sent.is_set(), "".join(lines)
        server.gate.set()
        if command == "train":  # the rest of a training run is tested elsewhere
            assert server.body_sent.wait(60)
            proc.kill()
        out, err = proc.communicate(timeout=120)
        timer.cancel()
    finally:
        server.gate.set()
        proc.kill()
        proc.wait()
    assert lines and lines[-1].strip() == f"downloading faces.zip: {human_bytes(nbytes)} from {url}", "".join(lines)
    assert server.body_sent.is_set()
    if command == "download":
        assert proc.returncode == 0 and out.startswith("prepared faces"), "".join(lines) + err


def test_http_error_is_network_error(server, root):
    with pytest.raises(NetworkError, match=r"404.*run the same command again"):
        download(f"{server.url}/missing.zip", sha256="a" * 64, name="x", root=root)


def test_unreachable_host_is_network_error(root):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(NetworkError, match=f"127.0.0.1:{port}/x.zip"):
        download(f"http://127.0.0.1:{port}/x.zip", sha256="a" * 64, name="x", root=root)


def test_url_needs_sha256(root):
    with pytest.raises(UsageError, match="--sha256 is required"):
        download("https://example.org/x.zip", root=root)
    with pytest.raises(DataNotFoundError, match="ddpmctl download https://example.org/x.zip --sha256"):
        load_images("https://example.org/x.zip", image_size=8, channels=3, root=root)


def test_url_with_sha256_fragment_loads_directly(server, root):
    sha = _zip(server.dir / "faces.zip")
    data = load_images(f"{server.url}/faces.zip#sha256={sha}", image_size=8, channels=1, root=root)
    assert data.images.shape == (6, 1, 8, 8)
    assert [d["name"] for d in list_prepared(root)] == ["faces"]


def test_interrupted_preparation_leaves_nothing(server, root):
    sha = _zip(server.dir / "faces.zip")

    def interrupt(ev):
        if ev["event"] == "progress" and ev.get("stage") == "prepare" and ev["done"] > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download(f"{server.url}/faces.zip", sha256=sha, name="faces", root=root, on_event=interrupt)
    assert list_prepared(root) == []
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]
    # The verified download stays cached: the retry needs no network.
    res = download(f"{server.url}/faces.zip", sha256=sha, name="faces", root=root)
    assert res.info["counts"] == {"train": 6} and len(server.requests) == 1


def test_name_clash_with_other_source_needs_force(server, root, tmp_path):
    sha = _zip(server.dir / "faces.zip")
    download(f"{server.url}/faces.zip", sha256=sha, name="faces", size=8, root=root)
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png((1, 2, 3)))
    with pytest.raises(UsageError, match="already exists.*--force"):
        download(str(folder), name="faces", root=root)
    res = download(str(folder), name="faces", root=root, size=8, force=True)
    assert res.info["counts"] == {"train": 1}


# ----------------------------------------------------------------- Hugging Face Hub (stubbed at huggingface_hub)


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _parquet(path: Path, images: list[bytes], column="image", hf_meta=True, struct_col=True, classes=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    if struct_col:
        col = pa.array([{"bytes": b, "path": None} for b in images],
                       type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        col = pa.array(images, type=pa.binary())
    table = pa.table({"label": pa.array(list(range(len(images))), pa.int64()), column: col})
    if hf_meta:
        label = {"names": classes, "_type": "ClassLabel"} if classes else {"dtype": "int64", "_type": "Value"}
        meta = {"info": {"features": {"label": label, column: {"_type": "Image"}}}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
    pq.write_table(table, path)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hub: repo -> {filename: local file}; records calls."""
    import huggingface_hub

    repos: dict[str, dict[str, Path]] = {}
    calls = []
    snap = tmp_path / "hub-cache"

    def list_repo_tree(repo_id, path_in_repo=None, *, recursive=False, expand=False, revision=None, repo_type=None,
                       token=None):
        from huggingface_hub.hf_api import RepoFile, RepoFolder

        calls.append(("list", repo_id, revision))
        assert repo_type == "dataset" and recursive
        if repo_id not in repos:
            from huggingface_hub.utils import RepositoryNotFoundError

            raise RepositoryNotFoundError(f"404 Client Error: Repository Not Found for url: {repo_id}",
                                          response=_FakeResponse())
        files = {n: p.stat().st_size for n, p in repos[repo_id].items()}
        folders = sorted({n.rsplit("/", 1)[0] for n in files if "/" in n})
        # The Hub lists LFS files (parquet, images) with their real size under "lfs", as it does.
        yield from (RepoFolder(path=d, oid="0" * 40) for d in folders)
        yield from (RepoFile(path=n, size=132, oid="0" * 40, lfs={"size": b, "oid": "0" * 64, "pointerSize": 132})
                    for n, b in sorted(files.items()))
        yield from (RepoFile(path=n, size=10, oid="0" * 40) for n in (".gitattributes", "README.md"))

    def hf_hub_download(repo_id, filename, *, repo_type=None, revision=None, cache_dir=None, tqdm_class=None):
        calls.append(("get", repo_id, filename))
        dest = snap / repo_id.replace("/", "--") / "snapshots" / COMMIT / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(repos[repo_id][filename].read_bytes())
        if tqdm_class is not None:  # exercise the progress bridge like the real function does
            bar = tqdm_class(total=dest.stat().st_size, unit="B", unit_scale=True, desc=filename)
            bar.update(dest.stat().st_size)
            bar.close()
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "list_repo_tree", list_repo_tree)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return repos, calls


class _FakeResponse:
    status_code = 404
    headers: dict = {}
    url = "https://huggingface.co/api/datasets/x"
    request = None

    def json(self):
        return {}


def test_hf_parquet_dataset(hub, tmp_path, root):
    repos, calls = hub
    src = tmp_path / "src"
    _parquet(src / "train.parquet", [_png((255, 0, 0)), _png((0, 255, 0)), b"not an image"])
    _parquet(src / "test.parquet", [_png((0, 0, 255))])
    repos["someone/colours"] = {"data/train-00000-of-00001.parquet": src / "train.parquet",
                                "data/test-00000-of-00001.parquet": src / "test.parquet"}
    events = []
    res = download("hf://datasets/someone/colours", size=8, root=root, on_event=events.append)
    info = res.info
    assert res.name == "someone--colours"
    assert info["counts"] == {"test": 1, "train": 2} and info["revision"] == COMMIT
    assert info["image_column"] == "image" and info["source"] == "hf://datasets/someone/colours"
    assert info["skipped"]["train"]["undecodable or truncated image"]["count"] == 1
    assert any(e["event"] == "progress" and e.get("unit") == "bytes" for e in events)
    data = load_images("hf://datasets/someone/colours", image_size=8, channels=3, root=root, allow_download=False)
    assert data.images.shape == (2, 3, 8, 8) and data.images[0, 0].float().mean() > 240
    # Already prepared: no Hub call at all.
    n = len(calls)
    assert download("hf://datasets/someone/colours", size=8, root=root).already_prepared
    assert len(calls) == n


def test_hf_download_states_its_size_before_fetching(hub, tmp_path, root):
    """The Hub's listing gives each file's size: the total of the files to fetch is stated before the
    first one is fetched, and files already in the cache are left out of it."""
    from ddpmctl.data.sources import CELEBA_HUB_REPO
    from ddpmctl.units import human_bytes

    repos, calls = hub
    _parquet(tmp_path / "tr.parquet", _celeba_like(2))
    _parquet(tmp_path / "te.parquet", _celeba_like(1))
    repos[CELEBA_HUB_REPO] = {"img_align+identity+attr/train-00000-of-00001.parquet": tmp_path / "tr.parquet",
                              "img_align+identity+attr/test-00000-of-00001.parquet": tmp_path / "te.parquet"}
    nbytes = (tmp_path / "tr.parquet").stat().st_size + (tmp_path / "te.parquet").stat().st_size
    download("celeba", root=root, on_event=lambda e: calls.append(("event", e)))
    sized = [i for i, c in enumerate(calls) if c[0] == "event" and c[1]["event"] == "download"]
    first_get = next(i for i, c in enumerate(calls) if c[0] == "get")
    assert len(sized) == 1 and sized[0] < first_get
    ev = calls[sized[0]][1]
    assert ev["bytes"] == nbytes and ev["message"].startswith(
        f"downloading celeba: {human_bytes(nbytes)} (2 file(s) of train, test) from hf://datasets/{CELEBA_HUB_REPO}")


def test_torchvision_download_states_its_size_before_starting(root, monkeypatch):
    """torchvision's downloader shows no Content-Length: the known size of its files is stated before it
    is asked to download (here it then fails, as it does offline)."""
    import torchvision.datasets

    from ddpmctl.data.sources import KNOWN

    events, asked = [], []

    def mnist(root_, train=True, download=False):
        if not download:
            raise RuntimeError("Dataset not found. You can use download=True to download it")
        asked.append(len(events))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", mnist)
    with pytest.raises(NetworkError, match="could not download mnist"):
        download("mnist", root=root, on_event=events.append)
    sized = [i for i, e in enumerate(events) if e["event"] == "download"]
    assert len(sized) == 1 and asked == [sized[0] + 1]  # stated, then torchvision asked to download
    assert events[sized[0]]["bytes"] == KNOWN["mnist"].download_bytes == 11_594_722
    assert events[sized[0]]["message"].startswith("downloading mnist: 11.1 MiB (4 gzipped IDX files")


def test_hf_split_column_and_binary_column(hub, tmp_path, root):
    repos, _ = hub
    _parquet(tmp_path / "p.parquet", [_png((9, 9, 9))] * 3, column="picture", hf_meta=False, struct_col=False)
    repos["o/n"] = {"train/0000.parquet": tmp_path / "p.parquet", "test/0000.parquet": tmp_path / "p.parquet"}
    res = download("hf://datasets/o/n@v1.0", split="test", size=8, root=root)
    assert res.info["splits"] == ["test"] and res.info["image_column"] == "picture"
    assert res.info["request"]["revision"] == "v1.0" and res.info["channels"] == 1  # grey pixels: auto -> 1
    with pytest.raises(UsageError, match="--column 'nope'"):
        download("hf://datasets/o/n", column="nope", name="other", root=root)
    with pytest.raises(UsageError, match="no split 'validation'.*test, train"):
        download("hf://datasets/o/n", split="validation", name="other", root=root)


def test_hf_image_files_repo(hub, tmp_path, root):
    repos, _ = hub
    files = {}
    for i, split in enumerate(["train", "train", "test"]):
        p = tmp_path / f"{i}.png"
        p.write_bytes(_png((i * 100, 50, 50)))
        files[f"{split}/cat/{i}.png"] = p
    repos["o/imgs"] = files
    res = download("hf://datasets/o/imgs", size=8, root=root)
    assert res.info["counts"] == {"test": 1, "train": 2} and res.info["hub_format"] == "images"


def test_hf_missing_repo_and_offline(hub, root, monkeypatch):
    with pytest.raises(DataNotFoundError, match="not found on the Hugging Face Hub"):
        download("hf://datasets/nobody/nothing", root=root)
    with pytest.raises(DataNotFoundError, match="ddpmctl download hf://datasets/o/x"):
        load_images("hf://datasets/o/x", image_size=8, channels=3, root=root, allow_download=False)

    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("Connection refused")

    monkeypatch.setattr(huggingface_hub, "list_repo_tree", offline)
    with pytest.raises(NetworkError, match="could not fetch hf://datasets/o/x.*again"):
        download("hf://datasets/o/x", root=root)


def _celeba_like(n: int) -> list[bytes]:
    """178x218 images: red, with the DDIM crop box (x 25..153, y 57..185) green."""
    out = []
    for i in range(n):
        a = np.zeros((218, 178, 3), np.uint8)
        a[..., 0] = 255
        a[57:185, 25:153] = (0, 255, i)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def test_celeba_from_hub_mirror_with_ddim_crop(hub, tmp_path, root):
    from ddpmctl.data.sources import CELEBA_HUB_REPO

    repos, calls = hub
    _parquet(tmp_path / "tr.parquet", _celeba_like(3))
    _parquet(tmp_path / "te.parquet", _celeba_like(2))
    repos[CELEBA_HUB_REPO] = {"img_align+identity+attr/train-00000-of-00001.parquet": tmp_path / "tr.parquet",
                              "img_align+identity+attr/valid-00000-of-00001.parquet": tmp_path / "te.parquet",
                              "img_align+identity+attr/test-00000-of-00001.parquet": tmp_path / "te.parquet"}
    events = []
    data = load_images("celeba", image_size=64, channels=3, root=root, on_event=events.append)
    assert any(e["event"] == "download" for e in events)
    assert data.images.shape == (3, 3, 64, 64)
    x = data.images.float()
    assert x[:, 1].mean() > 245 and x[:, 0].mean() < 10  # exactly the crop box: all green, no red border
    info = data.info
    assert info["counts"] == {"train": 3, "test": 2} and info["request"]["crop"] == "ddim"
    assert info["preprocessing"]["crop_box_178x218"] == [25, 57, 153, 185]
    assert "non-commercial" in info["licence"]
    assert not any(c[0] == "get" and "valid-" in c[2] for c in calls)
    # A different size is prepared as its own variant, not upscaled.
    res = download("celeba", size=32, root=root)
    assert res.name == "celeba-32" and res.info["size"] == 32


@pytest.mark.parametrize("torchvision_says", [
    "The daily quota of the file img_align_celeba.zip is exceeded",
    "To download files from GDrive, 'gdown' is required. You can install it with 'pip install gdown'.",
])
def test_celeba_hub_down_and_torchvision_fails(hub, root, monkeypatch, torchvision_says):
    """The message says what would help (a local copy, or a data root prepared elsewhere), and never
    `pip install gdown`: Drive's CelebA copy is over quota with it too."""
    import torchvision.datasets

    def no_gdrive(*a, **k):
        raise RuntimeError(torchvision_says)

    monkeypatch.setattr(torchvision.datasets, "CelebA", no_gdrive)
    with pytest.raises(NetworkError) as exc:
        download("celeba", root=root)
    msg = str(exc.value)
    assert "Hub" in msg and "torchvision" in msg and "pip install gdown" not in msg
    assert "ddpmctl train ./img_align_celeba/ --preset celeba" in msg and "DDPMCTL_DATA" in msg
    assert list_prepared(root) == []
    assert not (root / ".cache" / "torchvision").exists()  # no empty cache folders left behind


# ----------------------------------------------------------------------------- torchvision format (MNIST files on disk)


def _idx_images(arr: np.ndarray) -> bytes:
    return struct.pack(">IIII", 2051, arr.shape[0], arr.shape[1], arr.shape[2]) + arr.tobytes()


def _idx_labels(n: int) -> bytes:
    return struct.pack(">II", 2049, n) + bytes(n)


def test_mnist_prepared_from_torchvision_files(root):
    raw = root / ".cache" / "torchvision" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    (raw / "train-images-idx3-ubyte").write_bytes(_idx_images(train))
    (raw / "train-labels-idx1-ubyte").write_bytes(_idx_labels(12))
    (raw / "t10k-images-idx3-ubyte").write_bytes(_idx_images(test))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(_idx_labels(5))
    res = download("MNIST", root=root)
    assert res.name == "mnist" and res.info["counts"] == {"train": 12, "test": 5}
    assert res.info["size"] == 28 and res.info["channels"] == 1 and res.info["source"] == "torchvision:mnist"
    d = load_images("mnist", image_size=28, channels=1, root=root, allow_download=False)
    assert torch.equal(d.images[:, 0], torch.from_numpy(train))
    assert torch.equal(load_images("mnist", image_size=28, channels=1, split="test", root=root).images[:, 0],
                       torch.from_numpy(test))
    assert download("mnist", root=root).already_prepared
    # Resized variant: its own name, prepared at that size.
    v = download("mnist", size=32, root=root)
    assert v.name == "mnist-32" and v.info["size"] == 32
    assert load_images("mnist", image_size=32, channels=1, root=root).info["path"].endswith("mnist-32")
    # Tampering is detected on load.
    f = root / "mnist" / "images_train.npy"
    b = bytearray(f.read_bytes())
    b[-1] ^= 0xFF
    f.write_bytes(bytes(b))
    with pytest.raises(DataError, match="checksum"):
        load_images("mnist", image_size=28, channels=1, root=root)
    assert not download("mnist", root=root).already_prepared  # fails verification: prepared again


def test_known_dataset_errors(root):
    with pytest.raises(UsageError, match="--crop applies to celeba only"):
        download("cifar10", crop="ddim", root=root)
    with pytest.raises(UsageError, match="--sha256 does not apply"):
        download("mnist", sha256="a" * 64, root=root)
    with pytest.raises(UsageError, match="1 channel"):
        download("mnist", channels=3, root=root)
    with pytest.raises(UsageError, match="built in"):
        download("shapes", root=root)
    with pytest.raises(DataNotFoundError, match="shapes.*mnist.*hf://"):
        download("imagenet-1k", root=root)
    with pytest.raises(UsageError, match="--size must be between"):
        download("mnist", size=3, root=root)


# ----------------------------------------------------------------------------- the CLI against the served archive


def test_cli_downloads_served_archive(server, root, cli):
    sha = _zip(server.dir / "faces.zip")
    url = f"{server.url}/faces.zip"
    r = cli("download", url, "--sha256", sha, "--name", "faces", "--size", "16", "--root", str(root), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["name"] == "faces" and out["counts"] == {"train": 6} and out["already_prepared"] is False
    assert "prepare" in r.stderr and "skipped 1" in r.stderr
    r = cli("download", url, "--sha256", sha, "--name", "faces", "--size", "16", "--root", str(root))
    assert r.returncode == 0 and r.stdout.startswith("already prepared faces") and len(server.requests) == 1
    r = cli("download", url, "--sha256", "f" * 64, "--name", "other", "--root", str(root))
    assert r.returncode == 1 and "checksum mismatch" in r.stderr and r.stdout == ""
    r = cli("download", f"{server.url}/nope.zip", "--sha256", sha, "--name", "n", "--root", str(root))
    assert r.returncode == 1 and "HTTP 404" in r.stderr and "run the same command again" in r.stderr


def _idx(path: Path, arr: np.ndarray) -> None:
    """An MNIST-format (IDX) file: magic (0, 0, ubyte = 8, ndim), big-endian sizes, then the bytes."""
    path.write_bytes(struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
                     + arr.astype(np.uint8).tobytes())


def test_mnist_labels_are_kept_when_prepared(root):
    """torchvision's MNIST, read from its raw cache (no network): the prepared dataset keeps each image's
    digit as its label, and the class names are the digits."""
    raw = root / ".cache" / "torchvision" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        digits = rng.integers(0, 10, n)
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 0, :] = digits[:, None] * 20  # the first row tells the digit
        _idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", digits)
    res = download("mnist", root=root)
    assert res.info["classes"] == [str(d) for d in range(10)]
    for split in ("train", "test"):
        data = load_images("mnist", image_size=28, channels=1, split=split, root=root)
        assert data.classes == res.info["classes"]
        assert data.labels.tolist() == (data.images[:, 0, 0, 0].long() // 20).tolist()


def test_hf_class_label_column_becomes_labels(hub, tmp_path, root):
    """A parquet dataset whose `label` feature is a ClassLabel: its names are the classes, in their order,
    and each kept row keeps its class (the undecodable row is skipped, the labels stay aligned). An
    integer column named with --label-column gives classes '0'..'max'."""
    repos, _ = hub
    src = tmp_path / "src"
    _parquet(src / "train.parquet", [_png((255, 0, 0)), b"not an image", _png((0, 255, 0)), _png((0, 0, 255))],
             classes=["zebra", "ant", "cat", "dog"])  # rows are labelled 0, 1, 2, 3
    repos["someone/animals"] = {"data/train-00000-of-00001.parquet": src / "train.parquet"}
    res = download("hf://datasets/someone/animals", size=8, root=root)
    assert res.info["classes"] == ["zebra", "ant", "cat", "dog"] and res.info["label_column"] == "label"
    data = load_images("hf://datasets/someone/animals", image_size=8, channels=3, root=root, allow_download=False)
    assert data.labels.tolist() == [0, 2, 3]
    assert data.images[1, 1].float().mean() > 240  # row 2 (green) has label 2
    _parquet(src / "plain.parquet", [_png((255, 0, 0)), _png((0, 255, 0))])
    repos["someone/plain"] = {"data/train-00000-of-00001.parquet": src / "plain.parquet"}
    assert "classes" not in download("hf://datasets/someone/plain", size=8, root=root).info
    res = download("hf://datasets/someone/plain", size=8, root=root, name="plain2", label_column="label")
    assert res.info["classes"] == ["0", "1"]
    with pytest.raises(UsageError, match="--label-column 'kind' is not in"):
        download("hf://datasets/someone/plain", size=8, root=root, name="plain3", label_column="kind")
