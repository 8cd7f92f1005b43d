"""`ddpmctl hub-push` and `ddpmctl sample hf:...`, offline: HfApi's methods and snapshot_download are
stubbed (the third-party boundary); the uploaded folder, the calls and the card are checked."""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import FOLDER_FILES, copy_run, run_main
import torch
from safetensors.torch import load_file

TOKEN = "hf_test_token_123"


class FakeHub:
    """Replaces HfApi's network methods; records (method, token, kwargs) and copies the uploaded folder."""

    def __init__(self, root: Path):
        self.calls: list[tuple[str, str | None, dict]] = []
        self.uploaded = root / "uploaded"
        self.fail: dict[str, Exception] = {}

    def install(self, monkeypatch) -> "FakeHub":
        from huggingface_hub import HfApi

        def method(name, result):
            def call(api, *args, **kwargs):
                if args:
                    kwargs = {"repo_id": args[0], **kwargs}
                self.calls.append((name, api.token, kwargs))
                if name in self.fail:
                    raise self.fail[name]
                return result(**kwargs)
            return call

        def upload_folder(**k):
            shutil.copytree(k["folder_path"], self.uploaded)
            return SimpleNamespace(commit_url=f"https://huggingface.co/{k['repo_id']}/commit/0123abc")

        monkeypatch.setattr(HfApi, "whoami", method("whoami", lambda **k: {"name": "alice", "type": "user"}))
        monkeypatch.setattr(HfApi, "create_repo", method("create_repo", lambda **k: f"https://huggingface.co/{k['repo_id']}"))
        monkeypatch.setattr(HfApi, "create_branch", method("create_branch", lambda **k: None))
        monkeypatch.setattr(HfApi, "upload_folder", method("upload_folder", upload_folder))
        return self

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def kwargs(self, name: str) -> dict:
        return next(k for n, _, k in self.calls if n == name)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # to see that nothing is left behind
    return FakeHub(tmp_path).install(monkeypatch)


def http_error(status: int, url: str = "https://huggingface.co/api/repos/create"):
    """An HfHubHTTPError as huggingface_hub raises it, built on its own HTTP library's response."""
    from huggingface_hub.errors import HfHubHTTPError

    http = importlib.import_module(HfHubHTTPError.__mro__[1].__module__.split(".")[0])
    response = http.Response(status, request=http.Request("POST", url))
    return HfHubHTTPError(f"{status} Client Error for url: {url}\nRequest ID: xyz", response=response)


def connect_error():
    from huggingface_hub.errors import HfHubHTTPError

    http = importlib.import_module(HfHubHTTPError.__mro__[1].__module__.split(".")[0])
    return http.ConnectError("[Errno 111] Connection refused")


# ---------------------------------------------------------------- hub-push
def test_push_newest_run_exports_and_uploads_one_commit(trained_run, hub, tmp_path, monkeypatch, capsys):
    from huggingface_hub import ModelCard

    run = copy_run(trained_run, tmp_path / "runs" / "tiny")
    code, out, err = run_main(monkeypatch, capsys, "hub-push", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["repo_id"] == "alice/tiny"  # the run's name in the token owner's namespace
    assert res["url"] == "https://huggingface.co/alice/tiny"
    assert res["commit_url"].endswith("/commit/0123abc")

    assert hub.names() == ["whoami", "create_repo", "upload_folder"]
    assert all(token == TOKEN for _, token, _ in hub.calls)
    assert hub.kwargs("create_repo") == {"repo_id": "alice/tiny", "private": False, "exist_ok": True,
                                         "repo_type": "model"}
    up = hub.kwargs("upload_folder")
    assert up["repo_id"] == "alice/tiny" and up["revision"] is None and "tiny" in up["commit_message"]

    assert {p.name for p in hub.uploaded.iterdir()} == FOLDER_FILES
    weights = load_file(str(hub.uploaded / "model.safetensors"))
    ema = load_file(str(run / "checkpoints" / "step_00000004" / "ema.safetensors"))
    assert all(torch.equal(weights[k], ema[k]) for k in ema)
    card = ModelCard.load(hub.uploaded / "README.md")
    assert card.data.library_name == "ddpmctl"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert "ddpmctl sample hf:alice/tiny --n 16" in card.text

    assert not (run / "export").exists()  # exported into a temporary folder, then removed
    assert list((tmp_path / "tmp").iterdir()) == []


def test_push_model_folder_with_all_options(trained_run, hub, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "my-model"
    shutil.copytree(trained_run / "export", folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, out, err = run_main(monkeypatch, capsys, "hub-push", "my-model", "--repo-id", "org/shapes-ddpm",
                              "--private", "--revision", "v2", "--commit-message", "retrained")
    assert code == 0, err
    assert out.strip() == "https://huggingface.co/org/shapes-ddpm/tree/v2"
    assert "pushed 4 files to org/shapes-ddpm" in err

    assert hub.names() == ["whoami", "create_repo", "create_branch", "upload_folder"]
    assert hub.kwargs("create_repo")["private"] is True and hub.kwargs("create_repo")["exist_ok"] is True
    assert hub.kwargs("create_branch") == {"repo_id": "org/shapes-ddpm", "branch": "v2", "exist_ok": True,
                                           "repo_type": "model"}
    up = hub.kwargs("upload_folder")
    assert (up["revision"], up["commit_message"]) == ("v2", "retrained")

    # the weights go up untouched; the card's command now names the Hub repo
    assert (hub.uploaded / "model.safetensors").read_bytes() == before["model.safetensors"]
    card = (hub.uploaded / "README.md").read_text()
    assert "ddpmctl sample hf:org/shapes-ddpm --n 16" in card and "runs/tiny/export" not in card
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the local folder is unchanged


def test_dry_run_shows_repo_files_and_card_without_network(trained_run, cli, tmp_path):
    copy_run(trained_run, tmp_path / "runs" / "tiny")
    r = cli("hub-push", "runs/tiny", "--dry-run")  # HF_HUB_OFFLINE=1 and no token: nothing may go online
    assert r.returncode == 0, r.stderr
    assert "repo: <token-owner>/tiny" in r.stdout
    for name in FOLDER_FILES:
        assert f"  {name}  " in r.stdout
    assert "library_name: ddpmctl" in r.stdout and "# tiny" in r.stdout
    assert "ddpmctl sample 'hf:<token-owner>/tiny' --n 16" in r.stdout
    assert "nothing was uploaded" in r.stderr
    assert not (tmp_path / "runs" / "tiny" / "export").exists()


def test_dry_run_json_makes_no_hub_call(trained_run, hub, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "hub-push", str(trained_run / "export"), "--dry-run",
                              "--json", "--repo-id", "me/shapes")
    assert code == 0, err
    res = json.loads(out)
    assert hub.calls == []
    assert res["dry_run"] is True and res["repo_id"] == "me/shapes"
    assert set(res["files"]) == FOLDER_FILES and all(size > 0 for size in res["files"].values())
    assert res["files"]["model.safetensors"] == (trained_run / "export" / "model.safetensors").stat().st_size
    assert "ddpmctl sample hf:me/shapes" in res["card"]


def test_no_token_exits_1_with_how_to_log_in(trained_run, cli, tmp_path, monkeypatch):
    copy_run(trained_run, tmp_path / "runs" / "tiny")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    r = cli("hub-push", "runs/tiny", env={"HF_HUB_OFFLINE": "0"})  # HF_HOME is empty: no login cache
    assert r.returncode == 1
    assert "no Hugging Face token" in r.stderr and "hf auth login" in r.stderr and "HF_TOKEN" in r.stderr
    assert "pipx run --spec huggingface_hub hf auth login" in r.stderr  # `hf` is not on PATH under pipx
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "runs" / "tiny" / "export").exists()


def test_invalid_token_exits_1_before_any_work(trained_run, hub, tmp_path, monkeypatch, capsys):
    copy_run(trained_run, tmp_path / "runs" / "tiny")
    hub.fail["whoami"] = http_error(401, "https://huggingface.co/api/whoami-v2")
    code, out, err = run_main(monkeypatch, capsys, "hub-push", "runs/tiny")
    assert code == 1
    assert "invalid or expired" in err and "hf auth login" in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert hub.names() == ["whoami"]
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("method, error, message", [
    ("create_repo", connect_error, "network error (ConnectError"),
    ("create_repo", lambda: http_error(403), "may not write to org/x (HTTP 403)"),
    ("upload_folder", lambda: http_error(500), "uploading to org/x: HTTP 500"),
])
def test_http_and_network_errors_are_one_line(trained_run, hub, tmp_path, monkeypatch, capsys, method, error,
                                              message):
    hub.fail[method] = error()
    code, out, err = run_main(monkeypatch, capsys, "hub-push", str(trained_run / "export"), "--repo-id", "org/x")
    assert code == 1
    assert message in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err and out == ""
    assert list((tmp_path / "tmp").iterdir()) == []  # the staged copy is gone


def test_failed_upload_of_a_run_leaves_nothing_half_exported(trained_run, hub, tmp_path, monkeypatch, capsys):
    run = copy_run(trained_run, tmp_path / "runs" / "tiny")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    hub.fail["upload_folder"] = connect_error()
    code, _, err = run_main(monkeypatch, capsys, "hub-push", "runs/tiny", "--repo-id", "org/x")
    assert code == 1 and "network error" in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert list((tmp_path / "tmp").iterdir()) == []


def test_offline_mode_and_bad_arguments(trained_run, hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_main(monkeypatch, capsys, "hub-push", str(trained_run / "export"), "--repo-id", "org/x")
    assert code == 1 and "HF_HUB_OFFLINE" in err and "--dry-run" in err
    monkeypatch.delenv("HF_HUB_OFFLINE")

    code, _, err = run_main(monkeypatch, capsys, "hub-push", str(trained_run / "export"), "--repo-id", "noslash")
    assert code == 2 and "OWNER/NAME" in err

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    code, _, err = run_main(monkeypatch, capsys, "hub-push", "pickled", "--repo-id", "org/x")
    assert code == 2 and "never loads pickle" in err
    assert hub.calls == []


def test_repo_names_are_valid_hub_names():
    from huggingface_hub.utils import validate_repo_id

    from ddpmctl.hub import repo_name_for

    for name in ("shapes-20261126-101500", "my run (2)", "--weird..name--", "ü" * 10, "a" * 200):
        validate_repo_id(f"alice/{repo_name_for(name)}")
    assert repo_name_for("shapes-20261126-101500") == "shapes-20261126-101500"
    assert repo_name_for("my run (2)") == "my-run-2"


# ---------------------------------------------------------------- sample hf:
def test_sample_source_hf_downloads_with_an_allow_list(trained_run, monkeypatch):
    import huggingface_hub

    from ddpmctl.errors import NetworkError, UsageError
    from ddpmctl.modelfolder import load_source
    from ddpmctl.spec import RunSpec

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(trained_run / "export")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    den = load_source("hf:alice/tiny@v1")
    assert den.source == "hf:alice/tiny@v1" and den.weights == "ema" and isinstance(den.spec, RunSpec)
    assert den.spec.model.base_channels == 16
    repo_id, kw = calls[0]
    assert repo_id == "alice/tiny" and kw["revision"] == "v1"
    assert kw["allow_patterns"] == ["*.safetensors", "*.json", "*.md", "*.png"]
    load_source("hf:alice/tiny")
    assert calls[1][1]["revision"] is None

    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(repo_id, **kwargs):
        raise RepositoryNotFoundError("404 Client Error", response=http_error(404).response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(NetworkError, match="repository alice/nope not found"):
        load_source("hf:alice/nope")
    for bad in ("hf:", "hf:alice/tiny@", "hf:a/b/c"):
        with pytest.raises(UsageError):
            load_source(bad)


def _cache_snapshot(hf_home: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Lay out huggingface_hub's cache for a repo as a download would (refs/main -> snapshots/<commit>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():  # names may hold folders (a diffusers repo's unet/, scheduler/)
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(data)


def test_sample_hf_offline_from_the_cache(trained_run, cli, tmp_path):
    from ddpmctl.images import list_images, make_grid, read_image

    export = trained_run / "export"
    _cache_snapshot(tmp_path / "hf-home", "alice/tiny", {p.name: p.read_bytes() for p in export.iterdir()})
    r = cli("sample", "hf:alice/tiny", "--n", "16", "--sampler", "ddim", "--steps", "2", "--seed", "0",
            "--precision", "fp32", "--out", "s")  # HF_HUB_OFFLINE=1 (conftest)
    assert r.returncode == 0, r.stderr
    assert json.loads(Path("s/samples.json").read_text())["source"] == "hf:alice/tiny"
    drawn = torch.stack([read_image(p) for p in list_images(Path("s"))])
    assert torch.equal(make_grid(drawn, nrow=4), read_image(export / "samples.png"))

    r = cli("sample", "hf:alice/missing", "--n", "1", "--out", "m")
    assert r.returncode == 1
    assert "not in the local Hugging Face cache" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    assert "Traceback" not in r.stderr and not Path("m").exists()
