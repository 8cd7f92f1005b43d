import json

import pytest

from ddpmctl import spec as S
from ddpmctl.errors import SpecError, UsageError


def test_presets_validate():
    for name in S.PRESETS:
        sp = S.resolve(name)
        assert sp.preset == name


def test_precedence_preset_file_set_flags(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[optim]\nlr = 0.001\nwarmup_steps = 7\n[train]\nbatch_size = 16\n')
    sp = S.resolve("shapes", spec_file=f, sets=["optim.lr=0.002", "train.batch_size=8"],
                   overrides={"train": {"batch_size": 4, "epochs": None}})
    assert sp.optim.lr == 0.002  # --set beats the file
    assert sp.optim.warmup_steps == 7  # the file beats the preset
    assert sp.train.batch_size == 4  # flags beat --set
    assert sp.train.epochs == S.PRESETS["shapes"]["train"]["epochs"]  # None flags change nothing


def test_json_spec_file_and_list_set(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"model": {"base_channels": 64}}))
    sp = S.resolve("cifar10", spec_file=f, sets=["model.channel_mult=1,2,2"])
    assert sp.model.base_channels == 64 and sp.model.channel_mult == (1, 2, 2)


def test_bad_value_names_field_value_and_rule():
    with pytest.raises(SpecError) as e:
        S.resolve("shapes", sets=["optim.lr=-1"])
    msg = str(e.value)
    assert "optim.lr" in msg and "-1" in msg and "greater than 0" in msg


def test_unknown_field_lists_known_fields():
    with pytest.raises(SpecError) as e:
        S.resolve("shapes", sets=["optim.learning_rate=1"])
    assert "optim.learning_rate" in str(e.value) and "lr" in str(e.value)


def test_unknown_section_and_malformed_set():
    with pytest.raises(UsageError, match="unknown section"):
        S.resolve("shapes", sets=["optimizer.lr=1"])
    with pytest.raises(UsageError, match="section.field=value"):
        S.resolve("shapes", sets=["lr=1"])


def test_image_size_levels_cross_check():
    with pytest.raises(SpecError) as e:
        S.resolve("cifar10", sets=["model.image_size=28"])
    assert "28" in str(e.value) and "divisible by 8" in str(e.value)


def test_attention_resolution_must_exist():
    with pytest.raises(SpecError, match="attention_resolutions"):
        S.resolve("cifar10", sets=["model.attention_resolutions=[5]"])


def test_newer_spec_version_refused(tmp_path):
    p = tmp_path / "spec.json"
    d = S.dump(S.resolve("shapes"))
    d["version"] = S.SPEC_VERSION + 1
    p.write_text(json.dumps(d))
    with pytest.raises(SpecError, match="newer ddpmctl"):
        S.load(p)


def test_save_load_round_trip(tmp_path):
    sp = S.resolve("mnist", sets=["train.seed=5"])
    S.save(sp, tmp_path / "spec.json")
    assert S.load(tmp_path / "spec.json") == sp


def test_unknown_preset():
    with pytest.raises(UsageError, match="unknown preset 'nope'"):
        S.resolve("nope")


def test_recipe_ho2020_is_ho_et_al_over_any_preset():
    """--recipe ho2020: eps, linear 1e-4..0.02, T=1000, L_simple, Adam 2e-4 without weight decay,
    warm-up 5000, EMA 0.9999 (no EMA warm-up), dropout 0.1, DDPM over all 1000 steps; the preset keeps
    its network and data, and --set still wins over the recipe."""
    for preset in ("cifar10", "mnist", "celeba"):
        sp = S.resolve(preset, recipe="ho2020")
        base = S.resolve(preset)
        d, o, smp = sp.diffusion, sp.optim, sp.sample
        assert (d.prediction, d.schedule, d.timesteps, d.loss_weighting) == ("eps", "linear", 1000, "none")
        assert (o.name, o.lr, o.weight_decay, o.warmup_steps, o.ema_decay, o.ema_warmup, o.grad_clip) == \
            ("adamw", 2e-4, 0.0, 5000, 0.9999, False, 1.0)
        assert (smp.sampler, smp.steps) == ("ddpm", 1000) and sp.model.dropout == 0.1
        assert sp.recipe == "ho2020" and sp.preset == preset and base.recipe is None
        assert sp.model.model_dump(exclude={"dropout"}) == base.model.model_dump(exclude={"dropout"})
        assert sp.data == base.data and sp.train == base.train
    from ddpmctl.diffusion import make_betas

    betas = make_betas(S.resolve("cifar10", recipe="ho2020").diffusion.schedule, 1000)
    assert float(betas[0]) == pytest.approx(1e-4) and float(betas[-1]) == pytest.approx(0.02)
    assert S.resolve("cifar10", recipe="ho2020", sets=["optim.warmup_steps=10"]).optim.warmup_steps == 10
    with pytest.raises(UsageError, match="unknown recipe 'ho2021'.*ho2020"):
        S.resolve("cifar10", recipe="ho2021")


def test_loss_weighting_default_none_and_settable():
    assert S.RunSpec().diffusion.loss_weighting == "none"  # L_simple unless a preset or --set says otherwise
    d = S.resolve("shapes", sets=["diffusion.loss_weighting=min-snr", "diffusion.min_snr_gamma=3"]).diffusion
    assert (d.loss_weighting, d.min_snr_gamma) == ("min-snr", 3.0)
    with pytest.raises(SpecError, match="diffusion.loss_weighting"):
        S.resolve("shapes", sets=["diffusion.loss_weighting=minsnr"])


def test_mnist_small_is_the_cpu_sized_digits_preset():
    from ddpmctl.unet import build

    sp = S.resolve("mnist-small")
    m = sp.model
    assert (m.image_size, m.channels, m.base_channels, m.groups, sp.train.batch_size) == (28, 1, 32, 8, 64)
    assert 1.9e6 < sum(p.numel() for p in build(m).parameters()) < 2.1e6
    assert sp.data.source == "mnist" and not sp.data.flip
    assert sp.optim.warmup_steps == 187  # 10 % of its 2 epochs of MNIST (60,000 // 64 = 937 steps each)


def test_presets_use_the_measured_recipe():
    """docs/quality.md, "Quality per compute budget": SDE-DPM-Solver++ 20 (eta 1) beat DDIM 50 (eta 0),
    and v with min-SNR-5 beat eps, on real digits (two seeds); shapes keeps its own measured v recipe."""
    for name in ("mnist", "cifar10", "celeba", "shapes", "mnist-small"):
        smp = S.resolve(name).sample
        assert (smp.sampler, smp.steps, smp.eta) == ("dpm-solver++", 20, 1.0), name
    for name in ("mnist", "mnist-small", "cifar10", "celeba"):
        d = S.resolve(name).diffusion
        assert (d.prediction, d.loss_weighting, d.min_snr_gamma) == ("v", "min-snr", 5.0), name
    assert S.resolve("shapes").diffusion.loss_weighting == "none"
    # each preset holds its own copy of the shared settings
    assert S.PRESETS["mnist"]["sample"] is not S.PRESETS["cifar10"]["sample"]
    assert S.PRESETS["mnist"]["diffusion"] is not S.PRESETS["cifar10"]["diffusion"]
