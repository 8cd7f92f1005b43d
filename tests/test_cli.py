"""The CLI through its real entry point: exit codes, stdout/stderr split, messages."""

import json

import pytest
import torch

from ddpmctl import __version__
from ddpmctl.images import make_grid, read_image, save_png

from conftest import run_main, make_images


def test_version(cli):
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ddpmctl {__version__}"


def test_every_help_has_examples_plain_placeholders_and_literal_brackets(monkeypatch, capsys):
    """Each --help (in process): examples; no typer <bool> on flags, no {data} usage placeholder,
    no <list[str]>; and rich markup does not eat the brackets of an extra such as '[onnx]'."""
    from ddpmctl.cli import COMMANDS

    monkeypatch.setenv("COLUMNS", "160")
    pages = {}
    for cmd in ["", *(c.replace("_", "-") for c in COMMANDS)]:
        code, out, err = run_main(monkeypatch, capsys, *([cmd] if cmd else []), "--help")
        assert code == 0, err
        pages[cmd] = out
        assert "Examples" in out and f"ddpmctl {cmd}".strip() in out.split("Examples", 1)[1], cmd
        assert "<bool>" not in out and "list[" not in out, cmd
        assert "{" not in out and "}" not in out, cmd
    assert "Usage:" in pages["train"] and "[OPTIONS] DATA" in pages["train"]
    assert "--set" in pages["train"] and "SECTION.FIELD=VALUE" in pages["train"]
    assert "[onnx]" in pages["export"] and "[eval]" in pages["eval"] and "[demo]" in pages["demo"]


def test_dry_run_json_cifar10_parameter_count(cli, tmp_path):
    r = cli("train", "cifar10", "--dry-run", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert abs(out["parameters"] - 35.7e6) / 35.7e6 < 0.03
    assert out["spec"]["model"]["base_channels"] == 128
    assert out["device"] == {"type": "cpu", "threads": out["device"]["threads"]} and out["device"]["threads"] >= 1
    assert out["precision"] in ("fp32", "bf16") and out["spec"]["train"]["precision"] == "auto"  # resolved
    assert not (tmp_path / "runs").exists()  # wrote nothing


def test_dry_run_readable(cli):
    r = cli("train", "shapes", "--dry-run", "--epochs", "3", "--max-steps", "10")  # too short to time (test_cost)
    assert r.returncode == 0
    assert '"epochs": 3' in r.stdout and "parameters:" in r.stdout


@pytest.mark.parametrize("source,needle", [
    ("shapse", "unknown data source 'shapse' (did you mean shapes?)"),
    ("./no-such-folder", "no such folder or archive"),
    ("https://example.invalid/pics.zip", "is not prepared under"),  # no #sha256=: never downloaded by a run
])
def test_dry_run_refuses_a_data_source_the_real_run_refuses(monkeypatch, capsys, tmp_path, source, needle):
    dry = run_main(monkeypatch, capsys, "train", source, "--dry-run", "--json")
    real = run_main(monkeypatch, capsys, "train", source, "--max-steps", "1", "--out", str(tmp_path / "r"))
    assert dry[0] == real[0] == 2 and needle in dry[2] and dry[2] == real[2] and dry[1] == ""


def test_dry_run_of_a_known_dataset_not_downloaded_yet_passes_offline(monkeypatch, capsys, tmp_path):
    code, out, err = run_main(monkeypatch, capsys, "train", "cifar10", "--dry-run", "--json", "--max-steps", "5")
    assert code == 0, err
    assert json.loads(out)["spec"]["data"]["source"] == "cifar10"
    assert not (tmp_path / "data-root").exists()  # nothing downloaded, not even a cache folder


def test_bad_value_exit_2_names_field(cli):
    r = cli("train", "shapes", "--dry-run", "--lr", "-1")
    assert r.returncode == 2
    assert "optim.lr" in r.stderr and "-1" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_unknown_spec_field_exit_2(cli):
    r = cli("train", "shapes", "--dry-run", "--set", "train.epoch=3")
    assert r.returncode == 2 and "train.epoch" in r.stderr and "epochs" in r.stderr


def test_cuda_without_cuda_exit_2(cli):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = cli("train", "shapes", "--device", "cuda", "--max-steps", "1")
    assert r.returncode == 2 and "CUDA is not available" in r.stderr and "Traceback" not in r.stderr


def test_unknown_preset_exit_2(cli):
    r = cli("train", "shapes", "--preset", "imagenet", "--dry-run")
    assert r.returncode == 2 and "unknown preset 'imagenet'" in r.stderr


def test_missing_run_dir_exit_2(cli, tmp_path):
    r = cli("resume", str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = cli("resume", str(tmp_path))
    assert r.returncode == 2 and "not a ddpmctl run directory" in r.stderr


def test_sample_without_runs_exit_2(cli):
    r = cli("sample", "--n", "2", "--out", "x")
    assert r.returncode == 2 and "no run directories" in r.stderr


def test_out_is_a_file_exit_2(cli, tmp_path):
    (tmp_path / "taken").write_text("x")
    r = cli("train", "shapes", "--out", "taken", "--max-steps", "1")
    assert r.returncode == 2 and "is a file" in r.stderr


def test_debug_env_adds_traceback(cli):
    r = cli("resume", "nope", env={"DDPMCTL_DEBUG": "1"})
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_grid_of_folder(cli, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        save_png(folder / f"{i}.png", torch.full((3, 8, 8), i * 40, dtype=torch.uint8))
    r = cli("grid", "imgs", "--out", "g.png", "--nrow", "5")
    assert r.returncode == 0, r.stderr
    g = read_image(tmp_path / "g.png")
    assert g.shape == make_grid(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), nrow=5).shape


def test_grid_of_empty_folder_exit_2(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("grid", "empty", "--out", "g.png")
    assert r.returncode == 2 and "no .png" in r.stderr


def test_grid_never_writes_over_a_file_that_is_not_a_png(cli, tmp_path):
    """`grid --out RUN/spec.json` was an atomic, silent replacement of the run's spec."""
    (tmp_path / "imgs").mkdir()
    make_images(tmp_path / "imgs", 2)
    (tmp_path / "spec.json").write_text("{}")
    r = cli("grid", "imgs", "--out", "spec.json")
    assert r.returncode == 2 and "expected a .png file name" in r.stderr
    assert (tmp_path / "spec.json").read_text() == "{}"


def test_the_pipx_packages_of_each_extra_are_those_of_pyproject():
    """The install hints name the packages pyproject.toml's extras hold (gradio_client comes with gradio)."""
    import tomllib
    from pathlib import Path

    from ddpmctl.extras import PIPX_PACKAGES, install_hint

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for extra, packages in PIPX_PACKAGES.items():
        assert [p for p in extras[extra] if not p.startswith("gradio_client")] == list(packages)
        assert install_hint(extra).startswith(f"pip install '.[{extra}]'")
        # README's Installing section gives the same pipx commands (ones that install without a warning).
        readme = (Path(__file__).parents[1] / "README.md").read_text()
        assert f"pipx inject ddpmctl {' '.join(repr(p) for p in packages)}" in readme, extra


def test_dry_run_recipe_ho2020(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "train", "cifar10", "--recipe", "ho2020", "--dry-run", "--json",
                              "--max-steps", "5")
    assert code == 0, err
    spec = json.loads(out)["spec"]
    assert spec["recipe"] == "ho2020" and spec["diffusion"]["schedule"] == "linear"
    assert spec["optim"]["warmup_steps"] == 5000 and spec["sample"]["sampler"] == "ddpm"
    code, out, err = run_main(monkeypatch, capsys, "train", "cifar10", "--recipe", "nope", "--dry-run")
    assert code == 2 and "unknown recipe 'nope'" in err


def test_train_with_min_snr_weighting_end_to_end(cli, tmp_path):
    """--set diffusion.loss_weighting=min-snr trains (v and eps), records it in the spec, and changes the loss."""
    args = ["train", "shapes", "--max-steps", "2", "--batch-size", "4", "--set", "model.base_channels=16",
            "--set", "model.groups=8", "--set", "sample.grid_size=1", "--set", "sample.steps=2", "--seed", "1",
            "--json", "--quiet"]
    losses = {}
    for w in ("none", "min-snr"):
        r = cli(*args, "--set", f"diffusion.loss_weighting={w}", "--out", str(tmp_path / w), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        losses[w] = json.loads(r.stdout)["final_loss"]
        assert json.loads((tmp_path / w / "spec.json").read_text())["diffusion"]["loss_weighting"] == w
    assert losses["none"] != losses["min-snr"]


def test_train_named_after_a_preset_uses_its_data(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "train", "mnist-small", "--dry-run", "--json", "--max-steps", "5")
    assert code == 0, err
    spec = json.loads(out)["spec"]
    assert spec["preset"] == "mnist-small" and spec["data"]["source"] == "mnist"
