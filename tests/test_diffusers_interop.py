"""diffusers interop (issue 15): diffusers' UNet2DModel/DDPMPipeline folders load onto ddpmctl's own network
and sample the same; ddpmctl runs export folders that diffusers loads. diffusers is a test-only extra.

The google/ddpm-* configurations are reproduced with small channel counts (the real ones are checked for
shapes and parameter counts on the meta device); every parameter is random, zero-initialised ones too.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import randomise, run_cli, run_main
from test_hub import _cache_snapshot, hub  # noqa: F401  (hub: the stubbed HfApi fixture)

diffusers = pytest.importorskip("diffusers", reason="the diffusers interop tests need the test extra (diffusers)")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

NUMERICS = pytest.mark.numerics  # tolerance and bitwise checks: run again under the AVX2 cap in .ci/run

# The google/ddpm-* UNet2DModel configs (cifar10-32; celebahq/church/bedroom/cat-256 and their ddpm-ema-*
# twins share one), as released: Ho et al.'s network in diffusers' names.
GOOGLE_COMMON = {"act_fn": "silu", "attention_head_dim": None, "center_input_sample": False, "downsample_padding": 0,
                 "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
                 "mid_block_scale_factor": 1, "norm_eps": 1e-6, "norm_num_groups": 32,
                 "time_embedding_type": "positional"}
GOOGLE = {
    "ddpm-cifar10-32": {**GOOGLE_COMMON, "sample_size": 32, "block_out_channels": [128, 256, 256, 256],
                        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]},
    "ddpm-256 (celebahq, church, bedroom, cat)": {
        **GOOGLE_COMMON, "sample_size": 256, "block_out_channels": [128, 128, 256, 256, 512, 512],
        "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4},
}


def small(cfg: dict, **over) -> dict:
    """The same configuration with 1/8 of the channels, 8 groups and a quarter of the size (at least 32)."""
    return {**cfg, "block_out_channels": [c // 8 for c in cfg["block_out_channels"]], "norm_num_groups": 8,
            "sample_size": max(32, cfg["sample_size"] // 4), **over}


def random_unet(cfg: dict) -> UNet2DModel:
    torch.manual_seed(0)
    net = UNet2DModel(**cfg).eval()
    with torch.no_grad():
        for p in net.parameters():  # every parameter, zero-initialised ones included
            p.normal_(0.0, 0.15)
    return net


def scheduler(**over) -> DDPMScheduler:
    return DDPMScheduler(**{"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
                            "beta_end": 0.02, "clip_sample": True, "variance_type": "fixed_small", **over})


def pipeline_folder(tmp_path: Path, net: UNet2DModel, sched: DDPMScheduler, name: str = "pipe") -> Path:
    DDPMPipeline(unet=net, scheduler=sched).save_pretrained(tmp_path / name, safe_serialization=True)
    return tmp_path / name


def assert_same_outputs(net: UNet2DModel, den, n: int = 3, says: float = 0.1) -> None:
    size, ch = den.spec.model.image_size, den.spec.model.channels
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, ch, size, size, generator=g)
    t = torch.tensor([0, 1, den.spec.diffusion.timesteps - 1, 17, 500][:n])
    with torch.no_grad():
        want = net(x, t).sample
        got = den.model(x, t)
    assert want.abs().max() > says  # a network whose output says something
    # The same function in another order of float32 operations ([q|k|v] in one product, a folded
    # scale_shift norm, SDPA vs diffusers' processor): ~1e-6 on outputs of order 1 (measured 9.5e-7,
    # 1.1e-6); 1e-5 leaves room and still catches any wrong weight, order or constant.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- diffusers -> ddpmctl
@NUMERICS
@pytest.mark.parametrize("name", list(GOOGLE))
@pytest.mark.parametrize("shift", ["default", "scale_shift"])
def test_google_configs_load_onto_ddpmctls_network_and_agree(tmp_path, name, shift):
    from ddpmctl.modelfolder import load_source

    extra = {"resnet_time_scale_shift": shift, **({"attn_norm_num_groups": 8} if shift == "scale_shift" else {})}
    net = random_unet(small(GOOGLE[name], **extra))
    den = load_source(str(pipeline_folder(tmp_path, net, scheduler())))
    m = den.spec.model
    assert (m.time_injection, m.sinusoid_order, m.freq_shift, m.norm_eps, m.downsample_padding) == (
        "add" if shift == "default" else "scale_shift", "sin_cos", 1.0, 1e-6, "asymmetric")
    assert den.weights == "diffusers" and den.spec.sample.sampler == "ddpm"
    assert_same_outputs(net, den)


@pytest.mark.parametrize("name", list(GOOGLE))
def test_real_google_configs_map_shape_for_shape_on_the_meta_device(name):
    from ddpmctl import diffusersfmt as dfm
    from ddpmctl.spec import ModelSpec
    from ddpmctl.unet import build, count_parameters

    cfg = GOOGLE[name]
    spec = ModelSpec(**dfm.model_spec_from_unet_config(cfg, name))
    with torch.device("meta"):
        net = UNet2DModel(**cfg)
        ours = build(spec)
        mapped = dfm.state_dict_from_diffusers(dict(net.state_dict()), spec, name)
        out = ours(torch.zeros(1, 3, spec.image_size, spec.image_size), torch.zeros(1, dtype=torch.long))
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert count_parameters(ours) == sum(p.numel() for p in net.parameters())  # cifar10: 35.7M, 256: 113.7M
    assert out.shape == (1, 3, spec.image_size, spec.image_size)
    # one head per attention block (attention_head_dim null): as wide as the block
    assert all(a.heads == 1 for a in ours.modules() if type(a).__name__ == "Attention")


@NUMERICS
@pytest.mark.parametrize("schedule,prediction", [("linear", "epsilon"), ("squaredcos_cap_v2", "v_prediction")])
def test_ddpm_sampler_equals_ddpmpipeline_with_the_same_noise(tmp_path, schedule, prediction):
    from ddpmctl.diffusion import Schedule
    from ddpmctl.modelfolder import load_source
    from ddpmctl.samplers import ddpm_sample, per_image_generators, randn_per_image

    net = random_unet(small(GOOGLE["ddpm-cifar10-32"], block_out_channels=[16, 32], sample_size=16,
                            down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                            up_block_types=["AttnUpBlock2D", "UpBlock2D"]))
    sched = scheduler(num_train_timesteps=20, beta_schedule=schedule, beta_start=0.001, beta_end=0.2,
                      prediction_type=prediction)
    den = load_source(str(pipeline_folder(tmp_path, net, sched)))
    d = den.spec.diffusion
    assert (d.timesteps, d.schedule, d.prediction) == (20, "linear" if schedule == "linear" else "cosine",
                                                       "eps" if prediction == "epsilon" else "v")
    s = Schedule.create(d.schedule, d.timesteps, d.beta_range)
    torch.testing.assert_close(s.betas.float(), sched.betas, rtol=1e-6, atol=0)  # the same betas
    for seed in (0, 7):
        gens = per_image_generators([seed], "cpu")
        x_T = randn_per_image(gens, (3, 16, 16), "cpu")
        ours = ddpm_sample(den.model, s, x_T, gens, prediction=d.prediction)
        pipe = DDPMPipeline(unet=net, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        theirs = pipe(batch_size=1, generator=torch.Generator().manual_seed(seed), num_inference_steps=20,
                      output_type="np").images
        # the per-step network differences above (~1e-6) through 20 steps of clipped, contracting updates
        torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), torch.from_numpy(theirs),
                                   rtol=0, atol=1e-5)


def test_unmappable_configs_are_refused_naming_the_field(tmp_path):
    from ddpmctl import diffusersfmt as dfm
    from ddpmctl.errors import UsageError

    cfg = small(GOOGLE["ddpm-cifar10-32"])
    for field, value in [("time_embedding_type", "fourier"), ("up_block_types", ["UpBlock2D"] * 4),
                         ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]),
                         ("attention_head_dim", 24), ("out_channels", 6), ("class_embed_type", "timestep")]:
        with pytest.raises(UsageError, match=field.split("_types")[0]):
            dfm.model_spec_from_unet_config({**cfg, field: value}, "unet/config.json")
    for field, value in [("beta_schedule", "scaled_linear"), ("prediction_type", "sample"),
                         ("variance_type", "learned_range")]:
        with pytest.raises(UsageError, match=field):
            dfm.diffusion_from_scheduler_config({field: value}, "scheduler/scheduler_config.json")
    warned = []
    dfm.diffusion_from_scheduler_config({"variance_type": "fixed_large", "clip_sample": False}, "s", warned.append)
    assert any("--variance beta" in w for w in warned) and any("clip" in w for w in warned)


def test_a_pickle_only_diffusers_folder_is_refused_without_unpickling(tmp_path, monkeypatch, capsys):
    folder = pipeline_folder(tmp_path, random_unet(small(GOOGLE["ddpm-cifar10-32"])), scheduler())
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle to be opened")
    code, _, err = run_main(monkeypatch, capsys, "sample", str(folder), "--n", "1", "--out", str(tmp_path / "s"))
    assert code == 2, err
    assert "pickle" in err and "safe_serialization=True" in err
    assert not (tmp_path / "s").exists()


def test_hf_source_resolves_a_diffusers_repo_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    from ddpmctl.modelfolder import load_source

    net = random_unet(small(GOOGLE["ddpm-cifar10-32"]))
    folder = pipeline_folder(tmp_path, net, scheduler())
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    den = load_source("hf:google/ddpm-cifar10-32")
    assert calls[0][0] == "google/ddpm-cifar10-32" and "*.safetensors" in calls[0][1]["allow_patterns"]
    assert den.source == "hf:google/ddpm-cifar10-32"
    assert_same_outputs(net, den)


def test_sample_a_diffusers_repo_offline_from_the_hf_cache(tmp_path):
    """HF_HUB_OFFLINE=1 (conftest): huggingface_hub's own cache serves the repo, subfolders and all."""
    folder = pipeline_folder(tmp_path, random_unet(small(GOOGLE["ddpm-cifar10-32"])),
                             scheduler(num_train_timesteps=10, beta_end=0.2))
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    _cache_snapshot(tmp_path / "hf-home", "google/ddpm-tiny", files)
    r = run_cli("sample", "hf:google/ddpm-tiny", "--n", "2", "--out", "s")  # the scheduler's DDPM, all 10 steps
    assert r.returncode == 0, r.stderr
    assert json.loads(Path("s/samples.json").read_text())["source"] == "hf:google/ddpm-tiny"
    assert json.loads(Path("s/samples.json").read_text())["sampler"] == "ddpm"


def test_flat_layout_of_the_google_repos_loads(tmp_path):
    """google/ddpm-* keep config.json, the weights and scheduler_config.json side by side."""
    from ddpmctl.modelfolder import load_source

    net = random_unet(small(GOOGLE["ddpm-cifar10-32"]))
    net.save_pretrained(tmp_path / "flat", safe_serialization=True)
    scheduler(num_train_timesteps=40).save_pretrained(tmp_path / "flat")
    den = load_source(str(tmp_path / "flat"))
    assert den.spec.diffusion.timesteps == 40
    assert_same_outputs(net, den)


def test_sample_cli_draws_images_from_a_diffusers_folder(tmp_path, monkeypatch, capsys):
    net = random_unet(small(GOOGLE["ddpm-cifar10-32"]))
    folder = pipeline_folder(tmp_path, net, scheduler(num_train_timesteps=10, beta_end=0.2))
    code, out, err = run_main(monkeypatch, capsys, "sample", str(folder), "--n", "2", "--sampler", "ddim",
                              "--steps", "3", "--out", str(tmp_path / "s"))
    assert code == 0, err
    assert len(list((tmp_path / "s").glob("*.png"))) == 2


# ---------------------------------------------------------------- ddpmctl -> diffusers
# The tiny run of conftest.TRAIN_ARGS with the time embedding diffusers has (sinusoid of base_channels
# entries, MLP to 4 x base_channels); everything else is ddpmctl's default network (adaptive GroupNorm).
DIFFUSERS_SETS = ["--set", "model.time_embed_dim=16", "--set", "model.time_mlp_dim=64"]


@pytest.fixture(scope="module")
def diffusers_run(tmp_path_factory) -> Path:
    from conftest import TRAIN_ARGS

    base = tmp_path_factory.mktemp("drun")
    env = {"DDPMCTL_DATA": str(base / "data-root"), "HF_HOME": str(base / "hf-home"), "HF_HUB_OFFLINE": "1"}
    r = run_cli(*TRAIN_ARGS, *DIFFUSERS_SETS, "--set", "train.sample_every=1000", "--out", "runs/d", cwd=base,
                env=env)
    assert r.returncode == 0, r.stderr
    return base / "runs" / "d"


@NUMERICS
def test_export_format_diffusers_loads_in_diffusers_and_agrees(diffusers_run, tmp_path, monkeypatch, capsys):
    from ddpmctl import diffusersfmt as dfm
    from ddpmctl.modelfolder import load_run, load_source

    out = tmp_path / "exp"
    code, stdout, err = run_main(monkeypatch, capsys, "export", str(diffusers_run), "--format", "diffusers",
                                 "--out", str(out), "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert set(res["files"]) == {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                                 "scheduler/scheduler_config.json", "README.md", "samples.png"}
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "pipeline_tag: unconditional-image-generation" in card
    assert "trailing" in card and "linspace" in card  # the note on diffusers' timestep spacing

    net = UNet2DModel.from_pretrained(out / "unet").eval()
    assert net.config.resnet_time_scale_shift == "scale_shift"
    den = load_run(diffusers_run)  # the run's own EMA network (4 steps from its zero-initialised output layer)
    assert_same_outputs(net, den, says=1e-3)
    assert_same_outputs(net, load_source(str(out)), says=1e-3)  # and ddpmctl reads its own export back
    # The same mapping with every weight random, so that the outputs are far from zero.
    randomise(den.model)
    net.load_state_dict(dfm.state_dict_to_diffusers(den.model.state_dict(), den.spec.model))
    assert_same_outputs(net, den)

    pipe = DDPMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # the shapes preset predicts v
    assert pipe.scheduler.config.num_train_timesteps == den.spec.diffusion.timesteps
    images = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 32, 32, 3) and images.std() > 0.01


def test_export_format_diffusers_refuses_a_network_diffusers_cannot_express(trained_run, tmp_path, monkeypatch,
                                                                           capsys):
    out = tmp_path / "exp"
    code, _, err = run_main(monkeypatch, capsys, "export", str(trained_run), "--format", "diffusers",
                            "--out", str(out))
    assert code == 2, err
    assert "time_embed_dim 128 != base_channels 16" in " ".join(err.split()) and not out.exists()


def test_hub_push_format_diffusers_uploads_a_folder_diffusers_loads(diffusers_run, hub, tmp_path, monkeypatch,
                                                                    capsys):
    code, out, err = run_main(monkeypatch, capsys, "hub-push", str(diffusers_run), "--format", "diffusers",
                              "--repo-id", "alice/shapes-diffusers", "--json")
    assert code == 0, err
    assert hub.names() == ["whoami", "create_repo", "upload_folder"]
    up = hub.uploaded
    assert (up / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (up / "scheduler" / "scheduler_config.json").is_file() and (up / "model_index.json").is_file()
    card = (up / "README.md").read_text()
    assert "library_name: diffusers" in card and "DDPMPipeline.from_pretrained('alice/shapes-diffusers')" in card
    assert "ddpmctl sample hf:alice/shapes-diffusers" in card
    assert DDPMPipeline.from_pretrained(up).unet.config.sample_size == 32
    # The uploaded folder pushes again as it is; naming the other format is refused.
    code, _, err = run_main(monkeypatch, capsys, "hub-push", str(up), "--format", "ddpmctl", "--dry-run")
    assert code == 2 and "is a diffusers folder" in err


# ---------------------------------------------------------------- train --init
INIT_ARGS = ["train", "shapes", "--max-steps", "1", "--batch-size", "8", "--seed", "3", "--sample-every", "1000",
             "--set", "train.log_every=1", "--set", "sample.grid_size=1", "--set", "sample.sampler=ddim",
             "--set", "sample.steps=2"]


def first_loss(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_train_init_starts_from_the_sources_weights(tmp_path, monkeypatch, capsys):
    from ddpmctl.checkpoint import find_newest
    from ddpmctl.modelfolder import load_source
    from ddpmctl.rundir import load_spec

    net = random_unet(small(GOOGLE["ddpm-cifar10-32"]))
    with torch.no_grad():
        net.conv_out.weight.mul_(20)  # outputs of several units: a loss far from a fresh network's ~1
    source = pipeline_folder(tmp_path, net, scheduler())
    code, _, err = run_main(monkeypatch, capsys, *INIT_ARGS, "--init", str(source), "--out", str(tmp_path / "b"))
    assert code == 0, err
    spec = load_spec(tmp_path / "b")
    src = load_source(str(source))
    assert spec.train.init == str(source.resolve()) and spec.model == src.spec.model
    assert spec.diffusion == src.spec.diffusion
    # after one step (lr 1e-5 in the warm-up) the weights are still the source's, not a fresh network's
    model = find_newest(tmp_path / "b").tensors("model")
    want = src.model.state_dict()
    assert max(float((model[k] - want[k]).abs().max()) for k in want) < 1e-3

    # the same run without --init (same network, seed, batch, timesteps and noise) starts at a fresh
    # network's loss (~1: its output layer is zero); from the source, that network's loss (far larger)
    fresh = {k: v for k, v in json.loads((tmp_path / "b" / "spec.json").read_text()).items()}
    fresh["train"]["init"] = None
    (tmp_path / "fresh.json").write_text(json.dumps(fresh))
    code, _, err = run_main(monkeypatch, capsys, *INIT_ARGS, "--spec", str(tmp_path / "fresh.json"),
                            "--out", str(tmp_path / "c"))
    assert code == 0, err
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the source's output scale: its loss on eps targets is about mean(out^2) + 1
        expected = float(net(x, torch.full((64,), 500)).sample.pow(2).mean()) + 1
    assert first_loss(tmp_path / "c") < 1.5 and first_loss(tmp_path / "b") > 0.3 * expected > 3


@NUMERICS
def test_resume_of_an_init_run_is_bitwise_like_an_uninterrupted_one(tmp_path, monkeypatch, capsys, one_thread):
    from ddpmctl.checkpoint import find_newest

    source = pipeline_folder(tmp_path, random_unet(small(GOOGLE["ddpm-cifar10-32"])), scheduler())
    args = [*INIT_ARGS, "--init", str(source)]
    assert run_main(monkeypatch, capsys, *args, "--out", str(tmp_path / "a"))[0] == 0  # step 1, then resume
    code, _, err = run_main(monkeypatch, capsys, "resume", str(tmp_path / "a"), "--max-steps", "2")
    assert code == 0, err
    args[args.index("--max-steps") + 1] = "2"
    assert run_main(monkeypatch, capsys, *args, "--out", str(tmp_path / "b"))[0] == 0  # two steps at once
    a, b = find_newest(tmp_path / "a"), find_newest(tmp_path / "b")
    assert a.step == b.step == 2
    for kind in ("model", "ema"):
        ta, tb = a.tensors(kind), b.tensors(kind)
        assert all(torch.equal(ta[k], tb[k]) for k in tb)


def test_train_init_refuses_a_network_field_that_differs_naming_both_values(tmp_path, monkeypatch, capsys):
    source = pipeline_folder(tmp_path, random_unet(small(GOOGLE["ddpm-cifar10-32"])), scheduler())
    code, _, err = run_main(monkeypatch, capsys, *INIT_ARGS, "--init", str(source), "--set", "model.image_size=64",
                            "--out", str(tmp_path / "b"))
    assert code == 2
    assert "model.image_size=64" in err and "is 32" in err
    assert not (tmp_path / "b").exists()


def test_export_converts_a_diffusers_folder_to_a_ddpmctl_model_folder(tmp_path, monkeypatch, capsys):
    from ddpmctl.modelfolder import load_model_folder

    net = random_unet(small(GOOGLE["ddpm-cifar10-32"]))
    folder = pipeline_folder(tmp_path, net, scheduler(num_train_timesteps=20, beta_end=0.2))
    onnx = "onnx" if all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")) else None
    code, out, err = run_main(monkeypatch, capsys, "export", str(folder), "--out", str(tmp_path / "conv"), "--json",
                              *(["--format", "onnx"] if onnx else []))
    assert code == 0, err
    den = load_model_folder(tmp_path / "conv")
    assert_same_outputs(net, den)
    assert den.spec.sample.sampler == "ddim" and den.spec.model.time_injection == "add"
    card = (tmp_path / "conv" / "README.md").read_text()
    assert "library_name: ddpmctl" in card and f"converted from the diffusers folder `{folder}`" in card
    if onnx:
        assert json.loads(out)["onnx_max_abs_diff"] < 1e-4
    # a diffusers source is converted only into a ddpmctl folder, and needs --out
    assert run_main(monkeypatch, capsys, "export", str(folder), "--format", "diffusers", "--out", "x")[0] == 2
    assert run_main(monkeypatch, capsys, "export", str(folder))[0] == 2
