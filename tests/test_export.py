"""`ddpmctl export` and sampling from model folders: the folder's content, its card, the round trip
export -> sample, pickle refusal, ONNX. One tiny run is trained once per session (CLI, CPU; conftest.trained_run)."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import FOLDER_FILES, copy_run
from ddpmctl import __version__

def _images(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


# ---------------------------------------------------------------- the folder
def test_export_writes_a_self_describing_folder(trained_run):
    folder = trained_run / "export"
    assert {p.name for p in folder.iterdir()} == FOLDER_FILES

    # model.safetensors: the checkpoint's EMA weights, bit for bit, with dtype and version metadata
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["dtype"] == "fp32" and meta["weights"] == "ema" and meta["ddpmctl"] == __version__
    weights = load_file(str(folder / "model.safetensors"))
    ema = load_file(str(trained_run / "checkpoints" / "step_00000004" / "ema.safetensors"))
    assert set(weights) == set(ema)
    assert all(torch.equal(weights[k], ema[k]) for k in weights)

    # config.json: model + diffusion spec, enough to rebuild the network and the schedule
    from ddpmctl import spec as specmod
    from ddpmctl.diffusion import Schedule
    from ddpmctl.unet import build

    cfg = json.loads((folder / "config.json").read_text())
    run_spec = specmod.load(trained_run / "spec.json")
    assert cfg["model"] == run_spec.model.model_dump(mode="json")
    assert cfg["diffusion"] == run_spec.diffusion.model_dump(mode="json")
    rebuilt = specmod.validate({"model": cfg["model"], "diffusion": cfg["diffusion"]})
    build(rebuilt.model).load_state_dict(weights)  # strict: every parameter, right shapes
    assert Schedule.create(rebuilt.diffusion.schedule, rebuilt.diffusion.timesteps).T == 1000
    tr = cfg["training"]
    assert (tr["steps"], tr["images_seen"], tr["run"]) == (4, 32, "tiny")
    assert tr["final_loss"] > 0 and "shapes" in tr["dataset"]
    assert str(trained_run.parent) not in json.dumps(cfg)  # no local absolute paths published


def test_model_card_front_matter_and_body(trained_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained_run / "export" / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "ddpmctl"
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    assert meta["license"] == "mit"
    assert {"ddpmctl", "diffusion", "ddpm"} <= set(meta["tags"])
    text = card.text
    for fact in ("| optimizer steps | 4 |", "| images seen | 32 |", "| final loss | ", "| epochs | ",
                 "| dataset | shapes", "![16 samples](samples.png)"):
        assert fact in text, fact
    assert "## Evaluation" not in text  # no eval.jsonl in this run
    assert "ddpmctl sample runs/tiny/export --n 16 --sampler ddim --steps 2 --seed 0" in text
    assert "pipx install ." in text and "pypi.org" not in text and "pip install ddpmctl" not in text  # not on PyPI


def test_round_trip_folder_samples_like_the_run_and_reproduces_the_card_grid(trained_run, cli, tmp_path):
    run = copy_run(trained_run, tmp_path / "runs" / "tiny", with_export=True)
    card = (run / "export" / "README.md").read_text()
    command = next(line for line in card.splitlines() if line.startswith("ddpmctl sample "))
    args = shlex.split(command)[2:]  # the card's exact command, minus `ddpmctl sample`
    r = cli("sample", *args)
    assert r.returncode == 0, r.stderr
    from ddpmctl.images import list_images, make_grid, read_image

    drawn = torch.stack([read_image(p) for p in list_images(Path("samples"))])
    assert torch.equal(make_grid(drawn, nrow=4), read_image(run / "export" / "samples.png"))

    # sampling the run dir with the same seeds gives the same images (batch size does not matter)
    r = cli("sample", "runs/tiny", "--n", "16", "--sampler", "ddim", "--steps", "2", "--seed", "0",
            "--precision", "fp32", "--batch-size", "5", "--out", "from-run")
    assert r.returncode == 0, r.stderr
    from_folder, from_run = _images(Path("samples")), _images(Path("from-run"))
    assert len(from_folder) == 16 and from_folder == from_run
    meta = json.loads(Path("samples/samples.json").read_text())
    assert meta["source"] == "runs/tiny/export" and meta["weights"] == "ema"


def test_export_defaults_to_the_newest_run_and_refuses_a_nonempty_out(trained_run, cli, tmp_path):
    copy_run(trained_run, tmp_path / "runs" / "tiny")
    r = cli("export")
    assert r.returncode == 0, r.stderr
    assert "newest run" in r.stderr
    assert r.stdout.strip() == "runs/tiny/export"
    assert {p.name for p in Path("runs/tiny/export").iterdir()} == FOLDER_FILES

    r = cli("export")
    assert r.returncode == 2
    assert "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert "drawing samples.png" not in r.stderr  # refused before the work is announced


def test_export_fp16_raw_weights_with_evaluation_numbers(trained_run, tmp_path):
    from huggingface_hub import ModelCard

    from ddpmctl.export import export_model_folder
    from ddpmctl.modelfolder import load_model_folder

    run = copy_run(trained_run, tmp_path / "run")
    record = {  # as `ddpmctl eval` writes it
        "time": "2026-11-26T10:00:00+00:00", "source": str(run), "checkpoint": "step_00000004", "step": 4,
        "weights": "ema", "data": "shapes", "sampler": "ddim", "steps": 2, "n_samples": 50,
        "metrics": {"bpd": {"bits_per_dim": 7.25, "sem": 0.125, "n": 64, "stride": 10, "split": "test"},
                    "fid": {"value": 123.4, "n": 50, "biased_upward": True, "reference": {"split": "train"}}}}
    (run / "eval.jsonl").write_text(json.dumps(record) + "\n" + '{"torn line' + "\n")
    res = export_model_folder(run, tmp_path / "m16", dtype="fp16", use_ema=False)
    assert res.dtype == "fp16" and res.weights == "model" and res.step == 4
    with safe_open(str(tmp_path / "m16" / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["dtype"] == "fp16" and f.metadata()["weights"] == "model"
    w = load_file(str(tmp_path / "m16" / "model.safetensors"))
    raw = load_file(str(run / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in w.values())
    assert all(torch.equal(w[k], raw[k].half()) for k in w)
    assert (tmp_path / "m16" / "model.safetensors").stat().st_size < 0.6 * (
        trained_run / "export" / "model.safetensors").stat().st_size

    card = ModelCard.load(tmp_path / "m16" / "README.md").text
    assert "## Evaluation" in card
    assert "| bpd | 7.25 ± 0.125 | 4 | 64 held-out images (test split), stride 10 |" in card
    assert "| fid | 123.4 | 4 | 50 samples (ddim, 2 steps) vs the train split; fewer than 50,000" in card
    assert str(tmp_path) not in (tmp_path / "m16" / "config.json").read_text()  # eval's source path is dropped
    assert "raw (non-EMA) weights in fp16" in card

    den = load_model_folder(tmp_path / "m16")  # the network is float32 again for sampling
    assert den.weights == "model" and next(den.model.parameters()).dtype == torch.float32


def test_a_failed_export_leaves_nothing_behind(trained_run, cli, tmp_path):
    from ddpmctl.checkpoint import sha256_file

    run = copy_run(trained_run, tmp_path / "run")
    ck = run / "checkpoints" / "step_00000004"
    ema = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(ck / "ema.safetensors")).items()}
    save_file(ema, str(ck / "ema.safetensors"))
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["files"]["ema.safetensors"] = sha256_file(ck / "ema.safetensors")
    (ck / "manifest.json").write_text(json.dumps(manifest))

    r = cli("export", "run", "--out", "model")
    assert r.returncode == 1
    assert "error:" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("data-root", "hf-home"))) == ["run"]


# ---------------------------------------------------------------- loading model folders
def test_model_folder_without_optional_sections_loads_with_defaults(trained_run, tmp_path):
    from ddpmctl.modelfolder import load_source
    from ddpmctl.spec import RunSpec, SampleSpec

    folder = tmp_path / "minimal"
    folder.mkdir()
    shutil.copy(trained_run / "export" / "model.safetensors", folder)
    cfg = json.loads((trained_run / "export" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: cfg[k] for k in ("format", "model", "diffusion")}))
    den = load_source(str(folder))
    assert isinstance(den.spec, RunSpec)
    assert den.spec.model.base_channels == 16 and den.spec.sample == SampleSpec()
    assert den.source == str(folder)


def test_pickle_only_folder_is_refused_and_nothing_is_unpickled(trained_run, cli, tmp_path, monkeypatch):
    import pickle

    from ddpmctl.errors import UsageError
    from ddpmctl.modelfolder import load_source

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(trained_run / "export" / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    (folder / "ema.ckpt").write_bytes(b"nor this")

    def forbidden(*a, **k):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(UsageError, match="pickle"):
        load_source(str(folder))
    assert load_source(str(trained_run / "export")).weights == "ema"  # the real folder needs no pickle

    only = tmp_path / "only-pt"
    only.mkdir()
    (only / "model.pt").write_bytes(b"x")
    with pytest.raises(UsageError, match="model.pt.*never loads pickle"):
        load_source(only)

    r = cli("sample", "pickled", "--n", "1", "--out", "s")
    assert r.returncode == 2
    assert "pytorch_model.bin" in r.stderr and "never loads pickle" in r.stderr and "Traceback" not in r.stderr
    assert not Path("s").exists()


def test_foreign_config_is_refused(tmp_path):
    from ddpmctl.errors import UsageError
    from ddpmctl.modelfolder import load_model_folder

    folder = tmp_path / "diffusers"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(UsageError, match="not a ddpmctl model config"):
        load_model_folder(folder)


def test_out_dir_guard_knows_the_model_folder_files():
    """outdir spells the model-folder markers out (it must not load torch); they must stay the format's."""
    from ddpmctl.diffusersfmt import INDEX_FILE
    from ddpmctl.modelfolder import CONFIG_FILE, MODEL_FILE
    from ddpmctl.outdir import MODEL_MARKERS

    assert set(MODEL_MARKERS) == {CONFIG_FILE, MODEL_FILE, INDEX_FILE}  # INDEX_FILE: a diffusers folder


# ---------------------------------------------------------------- ONNX
def test_onnx_missing_packages_say_how_to_install(trained_run, tmp_path, monkeypatch):
    from ddpmctl.errors import UsageError
    from ddpmctl.export import export_model_folder

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(UsageError, match=r"pip install '\.\[onnx\]'.*pipx inject ddpmctl 'onnx>=1\.16'"):
        export_model_folder(trained_run, tmp_path / "m", onnx=True)
    assert not (tmp_path / "m").exists()


def test_onnx_export_matches_pytorch_with_a_dynamic_batch(trained_run, tmp_path):
    pytest.importorskip("onnx", reason="optional extra: pip install '.[onnx]'")
    ort = pytest.importorskip("onnxruntime", reason="optional extra: pip install '.[onnx]'")
    from ddpmctl.export import export_model_folder
    from ddpmctl.modelfolder import load_model_folder
    from ddpmctl.onnxexport import ONNX_ATOL

    res = export_model_folder(trained_run, tmp_path / "m", onnx=True)
    assert res.onnx_max_abs_diff is not None and res.onnx_max_abs_diff <= ONNX_ATOL
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["onnx"]["file"] == "model.onnx" and cfg["onnx"]["tolerance"] == ONNX_ATOL
    assert "model.onnx" in (tmp_path / "m" / "README.md").read_text()

    den = load_model_folder(tmp_path / "m")
    sess = ort.InferenceSession(str(tmp_path / "m" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x_t", "t"]
    for batch in (1, 5):  # neither is the export batch (2)
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        t = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = den.model(x, t)
        got = torch.from_numpy(sess.run(None, {"x_t": x.numpy(), "t": t.numpy()})[0])
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= ONNX_ATOL * max(1.0, ref.abs().max().item())


def test_onnx_of_a_conditional_model_takes_class_labels(cli, tmp_path):
    """A conditional model's ONNX graph has a third input, class_labels (the class count = no class), and
    matches PyTorch for each class and for the null class; config.json and the card list the classes."""
    pytest.importorskip("onnx", reason="optional extra: pip install '.[onnx]'")
    ort = pytest.importorskip("onnxruntime", reason="optional extra: pip install '.[onnx]'")
    from conftest import TRAIN_ARGS
    from ddpmctl.cond import Cond
    from ddpmctl.export import export_model_folder
    from ddpmctl.modelfolder import load_model_folder
    from ddpmctl.onnxexport import ONNX_ATOL

    r = cli(*TRAIN_ARGS, "--conditional", "--out", "run")
    assert r.returncode == 0, r.stderr
    export_model_folder(tmp_path / "run", tmp_path / "m", onnx=True)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model"]["classes"] == ["circle", "square", "triangle"]
    assert "`circle`, `square`, `triangle`" in (tmp_path / "m" / "README.md").read_text()
    den = load_model_folder(tmp_path / "m")
    sess = ort.InferenceSession(str(tmp_path / "m" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x_t", "t", "class_labels"]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([5, 500, 900, 999]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        ref = den.model(x, t, Cond(labels=labels))
    got = torch.from_numpy(sess.run(None, {"x_t": x.numpy(), "t": t.numpy(), "class_labels": labels.numpy()})[0])
    assert (got - ref).abs().max() <= ONNX_ATOL * max(1.0, ref.abs().max().item())
