"""RunSpec: the single source of truth for a run, saved as RUN_DIR/spec.json.

Sources, later wins: preset -> --recipe -> --spec FILE (TOML or JSON) -> --set section.field=value -> flags.
Every field is typed and bounded; cross-field validators say what would work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ddpmctl import __version__
from ddpmctl.errors import SpecError, UsageError
from ddpmctl.sampler_registry import SamplerName
from ddpmctl.smallfiles import read_object

SPEC_VERSION = 1
MAX_CHANNEL_MULT = 16  # widest level = base_channels x 16 at most (the presets use up to 4)
MAX_CLASSES = 100_000  # class embedding rows (ImageNet-21k has 21,841 classes)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Section):
    image_size: int = Field(32, ge=8, le=1024, description="Image height and width in pixels.")
    channels: Literal[1, 3] = Field(3, description="1 (grayscale) or 3 (RGB).")
    base_channels: int = Field(128, ge=8, le=1024, description="Channels of the first U-Net level.")
    channel_mult: tuple[int, ...] = Field((1, 2, 2, 2), min_length=1, max_length=8, description="Multiplier per level.")
    num_res_blocks: int = Field(2, ge=1, le=8, description="Residual blocks per level.")
    attention_resolutions: tuple[int, ...] = Field((16,), description="Feature-map sizes that get self-attention.")
    head_channels: int = Field(64, ge=8, le=1024, description="Channels per attention head.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout in residual blocks.")
    time_embed_dim: int = Field(256, ge=16, le=4096, description="Sinusoidal timestep embedding size.")
    groups: int = Field(32, ge=1, le=128, description="GroupNorm groups.")
    # Options that let the network express diffusers' UNet2DModel (and Ho et al.'s original network)
    # exactly (:mod:`ddpmctl.diffusersfmt`); the defaults are ddpmctl's own network.
    time_injection: Literal["scale_shift", "add"] = Field(
        "scale_shift", description="How a residual block takes the time embedding: scale_shift = adaptive "
        "GroupNorm (1 + scale) * norm(h) + shift (norm2 without affine); add = h + Linear(emb) before an affine "
        "norm2 (Ho et al. 2020; diffusers' resnet_time_scale_shift \"default\").")
    time_mlp_dim: Optional[int] = Field(None, ge=16, le=8192, description="Output size of the time MLP "
                                        "(None: time_embed_dim; diffusers: 4 x base_channels).")
    sinusoid_order: Literal["cos_sin", "sin_cos"] = Field(
        "cos_sin", description="Halves of the timestep sinusoid (diffusers' flip_sin_to_cos true: cos_sin).")
    freq_shift: float = Field(0.0, ge=0.0, le=1.0, description="Sinusoid frequencies exp(-log(10000) i / "
                              "(half - freq_shift)) (diffusers' freq_shift; Ho et al.: 1).")
    norm_eps: float = Field(1e-5, gt=0.0, le=1e-2, description="Epsilon of every GroupNorm.")
    downsample_padding: Literal["symmetric", "asymmetric"] = Field(
        "symmetric", description="Stride-2 convolution padding: symmetric = 1 pixel on every side; asymmetric = "
        "one row and column at the bottom and right only (TensorFlow's SAME; diffusers' downsample_padding 0).")
    conditional: bool = Field(False, description="Class-conditional network (classifier-free guidance): a class "
                              "embedding joins the time embedding; needs labelled data.")
    classes: tuple[str, ...] = Field((), max_length=MAX_CLASSES, description="Class names, in label order (filled "
                                     "from the data when a conditional run starts).")

    @property
    def num_classes(self) -> int:
        """Classes of a conditional network (0: unconditional); label ``num_classes`` is the null class."""
        return len(self.classes) if self.conditional else 0

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.classes and not self.conditional:
            raise ValueError("classes are given but conditional is false; set model.conditional=true "
                             "(or leave classes empty for an unconditional network)")
        if len(set(self.classes)) != len(self.classes) or any(not c.strip() for c in self.classes):
            raise ValueError(f"class names must be distinct and non-empty, got {list(self.classes)[:20]}")
        levels = len(self.channel_mult)
        if any(not 1 <= m <= MAX_CHANNEL_MULT for m in self.channel_mult):
            raise ValueError(f"channel_mult entries must be integers from 1 to {MAX_CHANNEL_MULT} (e.g. [1, 2, 2, 2]), "
                             f"got {list(self.channel_mult)}")
        div = 2 ** (levels - 1)
        if self.image_size % div:
            ok = [s for s in (28, 32, 64, 128, 256) if s % div == 0]
            raise ValueError(
                f"image_size {self.image_size} cannot be halved {levels - 1} times by {levels} levels "
                f"(channel_mult={list(self.channel_mult)}); use a size divisible by {div} (e.g. {ok}) "
                f"or fewer levels"
            )
        sizes = {self.image_size // 2**i for i in range(levels)}
        bad = [r for r in self.attention_resolutions if r not in sizes]
        if bad:
            raise ValueError(
                f"attention_resolutions {bad} are not feature-map sizes of this U-Net; choose from {sorted(sizes)}"
            )
        for c in {self.base_channels * m for m in self.channel_mult}:
            if c % self.groups:
                raise ValueError(
                    f"groups={self.groups} must divide every level's channels, but {c} is not divisible"
                )
        return self


class DiffusionSpec(_Section):
    timesteps: int = Field(1000, ge=10, le=10000, description="Number of diffusion steps T.")
    schedule: Literal["cosine", "linear"] = Field("cosine", description="Noise schedule.")
    prediction: Literal["eps", "v"] = Field("eps", description="What the network predicts.")
    loss_weighting: Literal["none", "min-snr"] = Field("none", description="none: L_simple (Ho et al.); min-snr: "
                                                       "weight each timestep's MSE by min(SNR, gamma) / SNR for eps, "
                                                       "/ (SNR + 1) for v (Hang et al. 2023).")
    min_snr_gamma: float = Field(5.0, gt=0, le=1e6, description="gamma of loss_weighting = min-snr.")
    beta_range: Optional[tuple[float, float]] = Field(
        None, description="linear schedule only: (beta_1, beta_T) as given (diffusers' beta_start, beta_end); "
        "None: 1e-4 to 0.02 scaled by 1000 / T (Ho et al.; improved-diffusion).")

    @model_validator(mode="after")
    def _check(self) -> "DiffusionSpec":
        if self.beta_range is not None:
            lo, hi = self.beta_range
            if self.schedule != "linear":
                raise ValueError(f"beta_range applies to the linear schedule only (schedule is {self.schedule!r}); "
                                 "remove it or set schedule = linear")
            if not 0.0 < lo <= hi < 1.0:
                raise ValueError(f"beta_range must satisfy 0 < beta_1 <= beta_T < 1, got {list(self.beta_range)}")
        return self


class DataSpec(_Section):
    source: str = Field("shapes", min_length=1, description="Dataset name, folder, archive, hf:// or https:// URL.")
    flip: bool = Field(True, description="Random horizontal flips.")


class OptimSpec(_Section):
    name: Literal["adamw", "sgd"] = Field("adamw", description="adamw, or sgd (with momentum) for the whole run.")
    lr: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate (of SGD too, warm start included).")
    weight_decay: float = Field(2e-4, ge=0, le=1.0, description="AdamW weight decay (seed project's value).")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    warmup_steps: int = Field(500, ge=0, description="Linear learning-rate warm-up steps.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this value.")
    ema_decay: float = Field(0.9999, ge=0, lt=1, description="EMA decay (reached after warm-up).")
    ema_warmup: bool = Field(True, description="EMA decay min(decay, (1+n)/(10+n)) so short runs get a useful EMA.")
    lr_backoff: float = Field(0.5, gt=0, le=1.0, description="Learning-rate factor applied at each NaN rollback.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (name = sgd, and the warm start).")
    warm_start_steps: int = Field(0, ge=0, description="With adamw: SGD with momentum for the first N steps, then "
                                  "AdamW with a fresh state (the seed project's cure for NaN images at 64x64).")

    @model_validator(mode="after")
    def _check(self) -> "OptimSpec":
        if self.name == "sgd" and self.warm_start_steps:
            raise ValueError("warm_start_steps switches from SGD to AdamW, so it needs name = adamw "
                             "(name = sgd trains with SGD throughout); set warm_start_steps = 0 or name = adamw")
        return self


class TrainSpec(_Section):
    epochs: int = Field(100, ge=1, le=100000, description="Epochs to train (an epoch = one pass over the data).")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(128, ge=1, le=65536)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    checkpoint_every: int = Field(1000, ge=1, description="Write a checkpoint every N steps (and at each epoch end).")
    keep_last: int = Field(3, ge=1, le=1000, description="Step checkpoints kept (epoch milestones are kept too).")
    milestones: bool = Field(True, description="Keep the EMA weights at every sample epoch (checkpoints/epoch_N).")
    rollback_after: int = Field(10, ge=0, le=100000, description="Roll back to the last good checkpoint after this "
                                "many non-finite steps in a row (0: never, only skip them).")
    max_rollbacks: int = Field(3, ge=0, le=1000, description="Stop with an error at the next divergence after this "
                               "many rollbacks.")
    sample_every: int = Field(10, ge=1, description="Save a fixed-seed sample grid every N epochs (and at the end).")
    log_every: int = Field(50, ge=1, description="Read metrics from the device and log every N steps.")
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile: auto = on for CUDA.")
    deterministic: bool = Field(False, description="Deterministic algorithms (always on for CPU).")
    label_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Conditional runs: share of training images "
                                 "whose label is replaced by the null class, so one network also learns the "
                                 "unconditional prediction that classifier-free guidance needs.")
    time_limit: Optional[float] = Field(None, gt=0, le=365 * 86400, description="Seconds of this process's wall "
                                        "time after which training stops at the next step boundary with a "
                                        "checkpoint (also 30m, 2h, 1d); `ddpmctl resume` continues.")
    init: Optional[str] = Field(None, description="Where the starting weights (and EMA) came from (`train --init`): "
                                "a run dir, a model folder, a diffusers folder or hf:OWNER/NAME[@REV]; the "
                                "model and diffusion sections are the source's.")

    @field_validator("time_limit", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        if isinstance(v, str):
            from ddpmctl.durations import ACCEPTED, parse_duration

            try:
                return parse_duration(v, "time_limit")
            except UsageError:
                raise ValueError(f"expected {ACCEPTED}") from None
        return v

    @model_validator(mode="after")
    def _check(self) -> "TrainSpec":
        d = self.device
        if d not in ("auto", "cpu", "cuda", "mps") and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {d!r}")
        return self


class SampleSpec(_Section):
    """How the training-time sample grids are drawn (and the default for `ddpmctl sample`)."""

    sampler: SamplerName = "ddim"
    steps: int = Field(50, ge=1, le=10000)
    eta: float = Field(0.0, ge=0.0, le=1.0)
    # 0 by measurement: on shapes, guidance did not raise class accuracy and added background noise at every
    # W tried (docs/conditional.md); literature values (Ho & Salimans: W ~ 0.3 for FID) are one flag away.
    guidance: float = Field(0.0, ge=0.0, le=100.0, description="Classifier-free guidance weight W of conditional "
                            "runs: (1 + W) * pred(x, class) - W * pred(x, null); 0 = no guidance (one network "
                            "evaluation per step).")
    grid_size: int = Field(64, ge=1, le=1024, description="Images in the per-epoch grid.")
    seed: int = Field(1234, ge=0)


class RunSpec(_Section):
    version: int = Field(SPEC_VERSION, ge=1, le=SPEC_VERSION, description="Spec format version (a newer one is "
                         "refused by validate() before its fields are read).")
    preset: str = "custom"
    recipe: Optional[str] = Field(None, description="The recipe laid over the preset (RECIPES; None: the preset's own).")
    model: ModelSpec = ModelSpec()
    diffusion: DiffusionSpec = DiffusionSpec()
    data: DataSpec = DataSpec()
    optim: OptimSpec = OptimSpec()
    train: TrainSpec = TrainSpec()
    sample: SampleSpec = SampleSpec()


# ---------------------------------------------------------------- presets
# The recipe of the mnist, mnist-small, cifar10 and celeba presets, measured on real digits at equal
# training steps, two seeds each (docs/quality.md, "Quality per compute budget"):
# * SDE-DPM-Solver++ (eta 1) in 20 steps beat DDIM 50 eta 0 (their old default) by 1.2-5.5x in Frechet
#   distance, for eps and for v, at 2.5x fewer network evaluations; DDIM's eps samples carry the
#   speckle issue 16 saw on MNIST.
# * min-SNR-5 loss weighting helped: v 25.9 -> 17.9 (floor 15.3), eps 20.9 -> 18.6; v with min-SNR
#   beat the old eps with L_simple on every seed (3). With min-SNR, v and eps tie at this sampler; v is
#   chosen because with DDIM and early in training it was 3.6-18x better, where eps draws speckle.
# `--recipe ho2020` gives Ho et al.'s eps, linear schedule, L_simple and DDPM sampling instead.
MEASURED_SAMPLER: dict[str, Any] = {"sampler": "dpm-solver++", "steps": 20, "eta": 1.0}
MEASURED_DIFFUSION: dict[str, Any] = {"prediction": "v", "loss_weighting": "min-snr", "min_snr_gamma": 5.0}

# Each preset is a partial spec: only what differs from the defaults above.
PRESETS: dict[str, dict[str, Any]] = {
    # Small and fast: trains recognisable shapes on a 2-core CPU in under 10 minutes.
    "shapes": {
        "model": {
            "image_size": 32, "channels": 3, "base_channels": 16, "channel_mult": (1, 2, 4),
            "num_res_blocks": 1, "attention_resolutions": (8,), "dropout": 0.0, "groups": 8,
            "head_channels": 32, "time_embed_dim": 128,
        },
        "data": {"source": "shapes"},
        "optim": {"lr": 1e-3, "warmup_steps": 100, "ema_decay": 0.995},
        "train": {"epochs": 14, "batch_size": 32, "checkpoint_every": 500, "sample_every": 2, "log_every": 20},
        # v-prediction: x0 = alpha x - sigma v needs no division by alpha, which under the cosine schedule
        # turns a small eps error at t ~ T into a bright-background bias (docs/quality.md, measured);
        # SDE-DPM-Solver++ (eta 1) at 20 steps draws grids that match 1000-step DDPM's.
        "diffusion": {"prediction": "v"},
        "sample": {"grid_size": 64, "sampler": "dpm-solver++", "steps": 20, "eta": 1.0},
    },
    # MNIST 28x28 grayscale (7.0M parameters); recipe: MEASURED_DIFFUSION and MEASURED_SAMPLER.
    "mnist": {
        "model": {
            "image_size": 28, "channels": 1, "base_channels": 64, "channel_mult": (1, 2, 2),
            "num_res_blocks": 2, "attention_resolutions": (7,), "dropout": 0.1,
        },
        "data": {"source": "mnist", "flip": False},
        "train": {"epochs": 50, "batch_size": 128, "sample_every": 5},
        "diffusion": dict(MEASURED_DIFFUSION),
        "sample": dict(MEASURED_SAMPLER),
    },
    # MNIST-type 28x28 grayscale sized for a CPU (2.0M parameters, the network issue 16 measured at
    # 43-49 images/s on 2 cores without AVX-512): 2 epochs of MNIST (1,874 steps of batch 64, ~45 min
    # there). The preset a CPU or Apple-Silicon user should pick for digits. Its recipe is what won on
    # real digits at equal steps (docs/quality.md, "Quality per compute budget", two seeds each): a
    # warm-up of 10 % of the run (187 steps; mnist's 500 would be 27 % here, and a warm-up longer than
    # the run left its samples noise), MEASURED_DIFFUSION and MEASURED_SAMPLER.
    "mnist-small": {
        "model": {
            "image_size": 28, "channels": 1, "base_channels": 32, "channel_mult": (1, 2, 2),
            "num_res_blocks": 2, "attention_resolutions": (7,), "dropout": 0.1, "groups": 8,
        },
        "data": {"source": "mnist", "flip": False},
        "optim": {"warmup_steps": 187},
        "train": {"epochs": 2, "batch_size": 64, "checkpoint_every": 500, "sample_every": 1},
        "diffusion": dict(MEASURED_DIFFUSION),
        "sample": dict(MEASURED_SAMPLER),
    },
    # Ho et al. 2020 CIFAR-10 network (35.7M parameters); recipe: MEASURED_DIFFUSION and MEASURED_SAMPLER; Ho et al.'s own
    # training and sampling recipe: --recipe ho2020.
    "cifar10": {
        "model": {
            "image_size": 32, "channels": 3, "base_channels": 128, "channel_mult": (1, 2, 2, 2),
            "num_res_blocks": 2, "attention_resolutions": (16,), "dropout": 0.1,
        },
        "data": {"source": "cifar10"},
        "train": {"epochs": 2000, "batch_size": 128, "sample_every": 50},
        "diffusion": dict(MEASURED_DIFFUSION),
        "sample": dict(MEASURED_SAMPLER),
    },
    # DDIM paper's CelebA-64 model; recipe: MEASURED_DIFFUSION and MEASURED_SAMPLER.
    "celeba": {
        "model": {
            "image_size": 64, "channels": 3, "base_channels": 128, "channel_mult": (1, 2, 2, 2, 4),
            "num_res_blocks": 2, "attention_resolutions": (16,), "dropout": 0.1,
        },
        "data": {"source": "celeba"},
        "train": {"epochs": 200, "batch_size": 64, "sample_every": 10},
        "diffusion": dict(MEASURED_DIFFUSION),
        "sample": dict(MEASURED_SAMPLER),
    },
}


# ---------------------------------------------------------------- recipes
# A recipe is a training/sampling recipe laid over any preset (after it, before --spec and --set):
# the presets keep their networks and data, the recipe sets the diffusion, loss, optimiser, EMA and
# sampler of a published setup, so a paper-comparable run is one flag away (`train --recipe ho2020`).
RECIPES: dict[str, dict[str, Any]] = {
    # Ho, Jain & Abbeel 2020 (arXiv:2006.11239, section 4 and appendix B; their diffusion_tf code,
    # scripts/run_cifar.py and tpu_utils.make_ema): eps-prediction, linear betas 1e-4..0.02, T = 1000,
    # L_simple (unweighted MSE); Adam at 2e-4 (no weight decay), 5,000 warm-up steps, gradient norm
    # clipped at 1, EMA 0.9999 (plain, no EMA warm-up); dropout 0.1 (their CIFAR-10 value); ancestral
    # sampling over all 1,000 steps (their CIFAR-10 variance is sigma^2 = beta: `sample --variance beta`).
    "ho2020": {
        "model": {"dropout": 0.1},
        "diffusion": {"timesteps": 1000, "schedule": "linear", "prediction": "eps", "loss_weighting": "none"},
        "optim": {"name": "adamw", "lr": 2e-4, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999,
                  "warmup_steps": 5000, "grad_clip": 1.0, "ema_decay": 0.9999, "ema_warmup": False,
                  "warm_start_steps": 0},
        "sample": {"sampler": "ddpm", "steps": 1000, "eta": 0.0},
    },
}


def recipe_dict(name: str) -> dict:
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)} "
                         "(or leave --recipe out for the preset's own recipe)")
    return RECIPES[name]


def _format_error(exc: ValidationError) -> str:
    lines = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            section = e["loc"][0] if len(e["loc"]) > 1 else None
            known = _known_fields(str(section)) if section else list(RunSpec.model_fields)
            msg = f"unknown field; known fields: {', '.join(known)}"
            lines.append(f"{loc}: {msg}")
            continue
        inp = e.get("input")
        shown = "" if isinstance(inp, dict) else f", got {_short(repr(inp))}"
        lines.append(f"{loc or 'spec'}: {msg}{shown}")
    return "; ".join(lines)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _known_fields(section: str) -> list[str]:
    field = RunSpec.model_fields.get(section)
    if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
        return list(RunSpec.model_fields)
    return list(field.annotation.model_fields)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def validate(data: dict) -> RunSpec:
    """Build a RunSpec, turning pydantic errors into one SpecError a user can act on."""
    version = data.get("version") if isinstance(data, dict) else None
    if isinstance(version, int) and version > SPEC_VERSION:  # before field checks: newer specs have new fields
        raise SpecError(f"spec version {version} was written by a newer ddpmctl (this is {__version__}, "
                        f"spec version {SPEC_VERSION}); upgrade ddpmctl")
    try:
        return RunSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_error(exc)) from None


def preset_dict(name: str) -> dict:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return _deep_merge({"preset": name}, PRESETS[name])


def load_spec_file(path: Path) -> dict:
    """Read a TOML or JSON spec file (partial specs allowed)."""
    if not path.is_file():
        raise UsageError(f"spec file {path} does not exist or is not a file")
    return read_object(path, expect="a (partial) run spec with sections such as model, train, optim")


def _parse_value(raw: str) -> Any:
    """`--set` values: JSON when it parses (numbers, true/false, lists), else the plain string."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise UsageError(f"--set value {_short(raw)!r} is nested too deeply") from None
    except json.JSONDecodeError:
        if "," in raw:  # 1,2,2,2 -> [1, 2, 2, 2]
            return [_parse_value(p) for p in raw.split(",")]
        return raw


def apply_sets(data: dict, sets: list[str]) -> dict:
    """Apply `section.field=value` overrides."""
    out = dict(data)
    for item in sets:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise UsageError(f"--set expects section.field=value (e.g. optim.lr=1e-4), got {item!r}")
        section, field = parts
        if section not in RunSpec.model_fields or section in ("version", "preset", "recipe"):
            sections = [s for s in RunSpec.model_fields if s not in ("version", "preset", "recipe")]
            raise UsageError(f"--set {item!r}: unknown section {section!r}; sections: {', '.join(sections)}")
        current = out.get(section, {})
        if not isinstance(current, dict):
            raise UsageError(f"--set {item!r}: section {section!r} of the spec is {_short(repr(current))}, "
                             "not a table of fields")
        out[section] = {**current, field: _parse_value(raw.strip())}
    return out


def resolve(
    preset: str,
    *,
    recipe: str | None = None,
    spec_file: Path | None = None,
    sets: list[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> RunSpec:
    """preset -> recipe -> spec file -> --set -> flags (later wins)."""
    data = preset_dict(preset)
    if recipe is not None:
        data = _deep_merge({**data, "recipe": recipe}, recipe_dict(recipe))
    if spec_file is not None:
        data = _deep_merge(data, load_spec_file(spec_file))
    data = apply_sets(data, sets or [])
    for section, fields in (overrides or {}).items():
        clean = {k: v for k, v in fields.items() if v is not None}
        if clean:
            data[section] = {**data.get(section, {}), **clean}
    return validate(data)


NETWORK_SECTIONS = ("model", "diffusion")  # what `train --init SOURCE` takes from SOURCE


def with_init(spec: RunSpec, source: RunSpec, init: str, sets: list[str] | None = None) -> RunSpec:
    """``spec`` with the model and diffusion sections of ``source`` (a `--init` source's spec) and
    train.init = ``init``. A model or diffusion field that ``sets`` (`--set`) gives another value than
    the source's is refused, naming both values (the network and the schedule are the source's)."""
    explicit = apply_sets({}, sets or [])
    for section in NETWORK_SECTIONS:
        got = getattr(source, section)
        for field, value in explicit.get(section, {}).items():
            try:
                same = getattr(type(got).model_validate({**got.model_dump(), field: value}), field) == getattr(got, field)
            except ValidationError:
                same = False
            if not same:
                raise UsageError(f"--set {section}.{field}={_short(json.dumps(value))} does not fit --init {init}: its "
                                 f"{section}.{field} is {_short(json.dumps(got.model_dump(mode='json').get(field)))} "
                                 "(the network and the schedule come from the --init source; the data is converted "
                                 "to its image size and channels)")
    data = dump(spec)
    data["model"], data["diffusion"] = dump(source)["model"], dump(source)["diffusion"]
    data["train"]["init"] = init
    return validate(data)


def without_network_sets(sets: list[str]) -> list[str]:
    """The `--set`s of other sections than model and diffusion (with `--init`, :func:`with_init` checks those)."""
    return [s for s in sets if s.partition("=")[0].strip().split(".")[0] not in NETWORK_SECTIONS]


def dump(spec: RunSpec) -> dict:
    return spec.model_dump(mode="json")


def save(spec: RunSpec, path: Path) -> None:
    from ddpmctl.safefile import atomic_write_text

    atomic_write_text(path, json.dumps(dump(spec), indent=2) + "\n")


def load(path: Path) -> RunSpec:
    """RUN_DIR/spec.json -> RunSpec; any problem is a UsageError naming the file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} not found: not a ddpmctl run directory")
    data = read_object(path, expect="a ddpmctl run spec")
    try:
        return validate(data)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
