"""`ddpmctl download` through the real entry point: results on stdout, messages on stderr, exit codes 0/1/2."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


def _pics(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((12, 12, 3), (i * 60, 80, 160), np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("x")
    return folder


def test_list_json_empty_then_prepared_folder(cli, tmp_path):
    r = cli("download", "--list", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["datasets"] == [] and out["root"] == os.environ["DDPMCTL_DATA"]
    assert "celeba" in out["downloadable"]

    _pics(tmp_path / "pics")
    r = cli("download", "./pics", "--size", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("prepared pics: train 3 images, 8x8x3") and "1 files skipped" in r.stdout
    assert "skipped 1 file(s): not an image file" in r.stderr  # messages go to stderr

    r = cli("download", "--list", "--json")
    (d,) = json.loads(r.stdout)["datasets"]
    assert d["name"] == "pics" and d["counts"] == {"train": 3} and d["size"] == 8 and d["channels"] == 3
    assert d["bytes"] > 3 * 3 * 8 * 8
    r = cli("download", "--list")
    assert r.returncode == 0 and "pics" in r.stdout and "8x8" in r.stdout


def test_usage_errors_exit_2(cli, tmp_path):
    cases = [
        (("download",), "give a dataset"),
        (("download", "nope"), "unknown data source 'nope'"),
        (("download", "./missing-folder"), "no such folder or archive"),
        (("download", "https://example.org/a.zip"), "--sha256 is required"),
        (("download", "--list", "mnist"), "--list takes no dataset"),
        (("download", "mnist", "--size", "2"), "--size must be between"),
    ]
    for args, needle in cases:
        r = cli(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert needle in r.stderr, (args, r.stderr)
        assert r.stdout == "", (args, r.stdout)


def test_option_parsing_error_exit_2(cli):
    r = cli("download", "mnist", "--size", "big")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--size" in r.stderr


def test_runtime_error_exit_1(cli, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    r = cli("download", "./empty")
    assert r.returncode == 1
    assert "no usable image in folder" in r.stderr and ".png, .jpg, .jpeg, .webp" in r.stderr
    assert r.stdout == ""


def test_progress_renderer_plain_lines(capfd):
    from ddpmctl.cli.progress import ProgressView

    with ProgressView() as on_event:
        on_event({"event": "progress", "stage": "prepare", "split": "train", "done": 0, "total": 10,
                  "unit": "images", "images_per_s": 0.0, "final": False})
        on_event({"event": "progress", "stage": "prepare", "split": "train", "done": 10, "total": 10,
                  "unit": "images", "images_per_s": 1234.0, "final": True})
        on_event({"event": "skipped", "count": 2, "reason": "undecodable", "message": "skipped 2 file(s): [x]"})
        on_event({"event": "download", "message": "cifar10 is not prepared yet"})
    out, err = capfd.readouterr()
    assert out == ""
    assert "prepare train: 10/10 images" in err and "1,234 images/s" in err
    assert "skipped 2 file(s): [x]" in err and "cifar10 is not prepared yet" in err
