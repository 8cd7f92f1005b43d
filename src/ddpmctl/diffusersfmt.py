"""diffusers' folder format <-> ddpmctl: the UNet2DModel config, its weights' names and the scheduler config.

A diffusers pipeline folder (what `DDPMPipeline.save_pretrained` writes and what the Hub's unconditional
image models are) is

    model_index.json                            {"_class_name": "DDPMPipeline", "unet": [...], "scheduler": [...]}
    unet/config.json                            UNet2DModel's constructor arguments
    unet/diffusion_pytorch_model.safetensors    its weights
    scheduler/scheduler_config.json             DDPMScheduler's (or DDIMScheduler's) arguments

and older repos (google/ddpm-*) may keep config.json, the weights and scheduler_config.json side by side
in one folder. This module maps the UNet2DModel configuration onto a :class:`~ddpmctl.spec.ModelSpec`
(ddpmctl's own network, so every sampler, bf16, compile, CUDA graphs and ONNX apply), the weights'
names onto ddpmctl's, and the scheduler onto a :class:`~ddpmctl.spec.DiffusionSpec`; and back, for
`ddpmctl export --format diffusers`. What cannot be mapped exactly is refused with a
:class:`~ddpmctl.errors.UsageError` naming the field. Reading and writing the files is
:mod:`ddpmctl.modelfolder`'s and :mod:`ddpmctl.export`'s business; torch is imported only by the weight
functions.

Verified numerically (tests/test_diffusers_interop.py): the mapped network's outputs equal UNet2DModel's
to 1e-5 in float32, and ddpmctl's DDPM sampler equals DDPMPipeline's with the same noise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ddpmctl.errors import UsageError

if TYPE_CHECKING:
    from torch import Tensor

    from ddpmctl.spec import DiffusionSpec, ModelSpec

INDEX_FILE = "model_index.json"
UNET_DIR = "unet"
SCHEDULER_DIR = "scheduler"
UNET_CONFIG = "config.json"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET_PICKLE = "diffusion_pytorch_model.bin"
SCHEDULER_CONFIG = "scheduler_config.json"
DIFFUSERS_VERSION = "0.30.0"  # written into the configs: the test extra's floor (the tests ran with 0.42.1)
CONVERT_HINT = ("convert it once with diffusers: `UNet2DModel.from_pretrained(FOLDER, subfolder=\"unet\")"
                ".save_pretrained(FOLDER + \"/unet\", safe_serialization=True)` (or "
                "`DDPMPipeline.from_pretrained(FOLDER).save_pretrained(OUT, safe_serialization=True)`)")

DOWN, ATTN_DOWN, UP, ATTN_UP = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"

Warn = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------------


def read_config(path: Path, what: str) -> dict:
    """A diffusers JSON config (one JSON object), through ddpmctl's one small-file reader."""
    from ddpmctl.smallfiles import read_object

    return read_object(path, expect=f"diffusers' {what}", toml=False)


def _class_name(path: Path) -> str | None:
    """The ``_class_name`` of a config, or None when it is not a readable small JSON object (the loader
    of the folder's own format then reports what is wrong with it)."""
    from ddpmctl.errors import DdpmctlError

    try:
        data = read_config(path, "config")
    except DdpmctlError:
        return None
    return data.get("_class_name")


def is_diffusers_folder(folder: Path) -> bool:
    """A pipeline folder (model_index.json or unet/config.json) or a flat UNet2DModel folder."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file() or (folder / UNET_DIR / UNET_CONFIG).is_file():
        return True
    return (folder / UNET_CONFIG).is_file() and _class_name(folder / UNET_CONFIG) == "UNet2DModel"


def locate(folder: Path, where: str) -> tuple[Path, Path | None]:
    """(folder holding the UNet's config and weights, scheduler config file or None)."""
    folder = Path(folder)
    unet = folder / UNET_DIR if (folder / UNET_DIR / UNET_CONFIG).is_file() else folder
    if not (unet / UNET_CONFIG).is_file():
        raise UsageError(f"{where} is a diffusers folder without a UNet: no {UNET_DIR}/{UNET_CONFIG} "
                         "(ddpmctl reads DDPMPipeline folders: model_index.json, unet/, scheduler/)")
    sched = next((p for p in (folder / SCHEDULER_DIR / SCHEDULER_CONFIG, folder / SCHEDULER_CONFIG) if p.is_file()),
                 None)
    return unet, sched


def weights_file(unet: Path, where: str) -> Path:
    """The UNet's safetensors file; a folder with pickled weights only is refused, with how to convert."""
    st = unet / UNET_WEIGHTS
    if st.is_file():
        return st
    rel = "" if unet.name != UNET_DIR else f"{UNET_DIR}/"
    if (unet / UNET_PICKLE).is_file():
        raise UsageError(f"{where} holds only pickled weights ({rel}{UNET_PICKLE}); ddpmctl never loads pickle "
                         f"files (unpickling can run arbitrary code): {CONVERT_HINT}")
    raise UsageError(f"{where}: no {rel}{UNET_WEIGHTS} (ddpmctl reads safetensors weights only; a repo with only "
                     f"{UNET_PICKLE} must be converted: {CONVERT_HINT})")


# ---------------------------------------------------------------------------------------------
# UNet2DModel config <-> ModelSpec
# ---------------------------------------------------------------------------------------------

# UNet2DModel arguments whose only value ddpmctl's network has (None: absent from old configs is fine too).
_FIXED = {
    "time_embedding_type": "positional", "act_fn": "silu", "center_input_sample": False,
    "mid_block_scale_factor": 1, "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "downsample_type": "conv", "upsample_type": "conv", "mid_block_type": "UNetMidBlock2D",
}


def _refuse(where: str, field: str, value: Any, why: str) -> UsageError:
    return UsageError(f"{where}: {field} = {json.dumps(value)} cannot be mapped onto ddpmctl's network ({why})")


def model_spec_from_unet_config(cfg: dict, where: str) -> dict:
    """UNet2DModel's config.json -> ModelSpec fields (validated by the caller), or a UsageError naming
    the field that has no exact equivalent."""
    cls = cfg.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise _refuse(where, "_class_name", cls, "only UNet2DModel, the unconditional image U-Net, is supported")
    for key, want in _FIXED.items():
        if cfg.get(key, want) != want:
            raise _refuse(where, key, cfg.get(key), f"ddpmctl's network has {json.dumps(want)} only")
    size = cfg.get("sample_size")
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int):
        raise _refuse(where, "sample_size", size, "expected one whole number: ddpmctl's images are square")
    cin, cout = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if cin != cout:
        raise _refuse(where, "out_channels", cout, f"ddpmctl predicts eps or v with as many channels as the "
                      f"input ({cin}); a learned variance (2 x channels) is not supported")
    boc = list(cfg.get("block_out_channels", (224, 448, 672, 896)))
    downs = list(cfg.get("down_block_types", (DOWN, ATTN_DOWN, ATTN_DOWN, ATTN_DOWN)))
    ups = list(cfg.get("up_block_types", (ATTN_UP, ATTN_UP, ATTN_UP, UP)))
    if not boc or len(downs) != len(boc) or len(ups) != len(boc):
        raise _refuse(where, "block_out_channels", boc, "one entry per down and up block expected")
    base = boc[0]
    if any(c % base for c in boc):
        raise _refuse(where, "block_out_channels", boc, f"every level must be a whole multiple of the first ({base})")
    for i, d in enumerate(downs):
        if d not in (DOWN, ATTN_DOWN):
            raise _refuse(where, f"down_block_types[{i}]", d, f"supported: {DOWN}, {ATTN_DOWN}")
    for i, u in enumerate(ups):
        if u not in (UP, ATTN_UP):
            raise _refuse(where, f"up_block_types[{i}]", u, f"supported: {UP}, {ATTN_UP}")
        if (u == ATTN_UP) != (downs[len(downs) - 1 - i] == ATTN_DOWN):
            raise _refuse(where, "up_block_types", ups, f"ddpmctl attends at the same resolutions on the way down "
                          f"and up; down_block_types is {downs}")
    attn_res = tuple(size // 2**i for i, d in enumerate(downs) if d == ATTN_DOWN)
    attn_ch = [c for c, d in zip(boc, downs) if d == ATTN_DOWN] + [boc[-1]]  # + the middle block's
    head_dim = cfg.get("attention_head_dim", 8)
    if head_dim is None:  # one head per attention block, as wide as the block
        head_channels = max(attn_ch)
    elif isinstance(head_dim, int) and head_dim > 0 and all(c % head_dim == 0 for c in attn_ch):
        head_channels = head_dim
    else:
        raise _refuse(where, "attention_head_dim", head_dim, f"must divide every attention block's channels {attn_ch}")
    groups = cfg.get("norm_num_groups", 32)
    attn_groups = cfg.get("attn_norm_num_groups")
    shift = cfg.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise _refuse(where, "resnet_time_scale_shift", shift, "supported: default (added), scale_shift")
    if attn_groups not in (None, groups) or (shift == "scale_shift" and attn_groups is None):
        raise _refuse(where, "attn_norm_num_groups", attn_groups, f"ddpmctl's attention blocks all have a GroupNorm "
                      f"with norm_num_groups ({groups}) groups")
    emb = cfg.get("time_embedding_dim")
    if emb not in (None, 4 * base):
        raise _refuse(where, "time_embedding_dim", emb, f"ddpmctl's time MLP is {base} -> {4 * base} -> N, "
                      f"so N = {4 * base} (or null)")
    pad = cfg.get("downsample_padding", 1)
    if pad not in (0, 1):
        raise _refuse(where, "downsample_padding", pad, "supported: 0 (bottom/right, TensorFlow's SAME) or 1")
    freq_shift = cfg.get("freq_shift", 0)
    return {
        "image_size": size, "channels": cin, "base_channels": base,
        "channel_mult": [c // base for c in boc], "num_res_blocks": cfg.get("layers_per_block", 2),
        "attention_resolutions": list(attn_res), "head_channels": head_channels,
        "dropout": float(cfg.get("dropout", 0.0)), "time_embed_dim": base, "groups": groups,
        "time_injection": "add" if shift == "default" else "scale_shift", "time_mlp_dim": 4 * base,
        "sinusoid_order": "cos_sin" if cfg.get("flip_sin_to_cos", True) else "sin_cos",
        "freq_shift": float(freq_shift), "norm_eps": float(cfg.get("norm_eps", 1e-5)),
        "downsample_padding": "asymmetric" if pad == 0 else "symmetric",
    }


def unet_config_from_spec(m: ModelSpec, *, num_classes: int | None = None) -> dict:
    """ModelSpec -> UNet2DModel's config.json, or a UsageError saying what diffusers cannot express."""
    why = []
    base = m.base_channels
    if num_classes:
        why.append(f"the network is class-conditional ({num_classes} classes); this export writes "
                   "unconditional DDPMPipeline folders")
    if m.time_embed_dim != base:
        why.append(f"time_embed_dim {m.time_embed_dim} != base_channels {base} (UNet2DModel's timestep sinusoid has "
                   "block_out_channels[0] entries)")
    mlp = m.time_mlp_dim or m.time_embed_dim
    if mlp != 4 * base:
        why.append(f"the time MLP's output is {mlp}, UNet2DModel's is 4 x block_out_channels[0] = {4 * base} "
                   f"(set time_mlp_dim = {4 * base})")
    levels = [base * k for k in m.channel_mult]
    sizes = [m.image_size // 2**i for i in range(len(levels))]
    attn_ch = [c for c, r in zip(levels, sizes) if r in m.attention_resolutions] + [levels[-1]]
    head_dim = None  # diffusers' null: one head per block
    if all(c % m.head_channels == 0 for c in attn_ch):  # channels // head_channels heads everywhere
        head_dim = m.head_channels
    elif any(c // m.head_channels > 1 for c in attn_ch):
        why.append(f"head_channels {m.head_channels} does not divide every attention block's channels {attn_ch} "
                   "(diffusers gives every block channels // attention_head_dim heads)")
    if why:
        raise UsageError("this network has no diffusers UNet2DModel equivalent: " + "; ".join(why) +
                         " (train with --set model.time_embed_dim=BASE --set model.time_mlp_dim=4*BASE to get one "
                         "that exports; docs/hub.md)")
    downs = [ATTN_DOWN if r in m.attention_resolutions else DOWN for r in sizes]
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": m.image_size, "in_channels": m.channels, "out_channels": m.channels,
        "center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
        "freq_shift": m.freq_shift if m.freq_shift != int(m.freq_shift) else int(m.freq_shift),
        "flip_sin_to_cos": m.sinusoid_order == "cos_sin",
        "down_block_types": downs, "mid_block_type": "UNetMidBlock2D",
        "up_block_types": [ATTN_UP if d == ATTN_DOWN else UP for d in reversed(downs)],
        "block_out_channels": levels, "layers_per_block": m.num_res_blocks, "mid_block_scale_factor": 1,
        "downsample_padding": 0 if m.downsample_padding == "asymmetric" else 1,
        "downsample_type": "conv", "upsample_type": "conv", "dropout": m.dropout, "act_fn": "silu",
        "attention_head_dim": head_dim, "norm_num_groups": m.groups, "attn_norm_num_groups": m.groups,
        "norm_eps": m.norm_eps,
        "resnet_time_scale_shift": "default" if m.time_injection == "add" else "scale_shift",
        "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    }


# ---------------------------------------------------------------------------------------------
# Scheduler config <-> DiffusionSpec
# ---------------------------------------------------------------------------------------------

_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}


def diffusion_from_scheduler_config(cfg: dict, where: str, on_warning: Warn | None = None) -> tuple[dict, dict]:
    """scheduler_config.json -> (DiffusionSpec fields, SampleSpec fields); warns where ddpmctl's samplers
    do something the scheduler would not."""
    warn = on_warning or (lambda _msg: None)
    T = cfg.get("num_train_timesteps", 1000)
    if cfg.get("trained_betas") is not None:
        raise _refuse(where, "trained_betas", "[...]", "ddpmctl's schedules are linear or cosine")
    kind = cfg.get("beta_schedule", "linear")
    diffusion: dict[str, Any] = {"timesteps": T}
    if kind == "linear":
        diffusion |= {"schedule": "linear",
                      "beta_range": [float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))]}
    elif kind == "squaredcos_cap_v2":
        diffusion["schedule"] = "cosine"
    else:
        raise _refuse(where, "beta_schedule", kind, "supported: linear, squaredcos_cap_v2 (ddpmctl's cosine)")
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in _PREDICTIONS:
        raise _refuse(where, "prediction_type", pred, "ddpmctl's networks predict epsilon or v (v_prediction)")
    diffusion["prediction"] = _PREDICTIONS[pred]
    variance = cfg.get("variance_type", "fixed_small")
    if variance in ("learned", "learned_range"):
        raise _refuse(where, "variance_type", variance, "a learned variance is not supported")
    if variance == "fixed_large":
        warn(f"{where}: variance_type fixed_large: pass --variance beta to the ddpm sampler to match diffusers "
             "(ddpmctl's default is beta_tilde, diffusers' fixed_small)")
    if not cfg.get("clip_sample", True) or float(cfg.get("clip_sample_range", 1.0)) != 1.0:
        warn(f"{where}: clip_sample {json.dumps(cfg.get('clip_sample'))}, clip_sample_range "
             f"{cfg.get('clip_sample_range', 1.0)}: ddpmctl's samplers clip the predicted x0 to [-1, 1], so samples "
             "can differ from diffusers'")
    if cfg.get("thresholding"):
        warn(f"{where}: thresholding (dynamic thresholding) is not applied by ddpmctl's samplers")
    sample = {"sampler": "ddpm", "steps": 50} if cfg.get("_class_name", "DDPMScheduler") == "DDPMScheduler" else {}
    return diffusion, sample


def scheduler_config_from_spec(d: DiffusionSpec) -> dict:
    """DiffusionSpec -> DDPMScheduler's scheduler_config.json (the same betas, prediction and clipping)."""
    cfg: dict[str, Any] = {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                           "num_train_timesteps": d.timesteps}
    if d.schedule == "linear":
        scale = 1000.0 / d.timesteps
        start, end = d.beta_range if d.beta_range is not None else (scale * 1e-4, scale * 0.02)
        cfg |= {"beta_schedule": "linear", "beta_start": start, "beta_end": end}
    else:
        cfg |= {"beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "beta_end": 0.02}
    return cfg | {"trained_betas": None, "variance_type": "fixed_small", "clip_sample": True,
                  "clip_sample_range": 1.0, "thresholding": False,
                  "prediction_type": {v: k for k, v in _PREDICTIONS.items()}[d.prediction],
                  "timestep_spacing": "leading", "steps_offset": 0}


def index_config() -> dict:
    """model_index.json of a DDPMPipeline folder."""
    return {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}


# ---------------------------------------------------------------------------------------------
# Weights: names and layouts
# ---------------------------------------------------------------------------------------------


def _modules(m: ModelSpec) -> list[tuple[str, str, str]]:
    """(ddpmctl prefix, diffusers prefix, kind) for every module with weights; kind: res | attn | plain."""
    out = [("time_mlp.0", "time_embedding.linear_1", "plain"), ("time_mlp.2", "time_embedding.linear_2", "plain"),
           ("conv_in", "conv_in", "plain")]
    levels = len(m.channel_mult)
    for i in range(levels):
        attn = m.image_size // 2**i in m.attention_resolutions
        for j in range(m.num_res_blocks):
            out.append((f"down.{i}.blocks.{j}", f"down_blocks.{i}.resnets.{j}", "res"))
            if attn:
                out.append((f"down.{i}.attn.{j}", f"down_blocks.{i}.attentions.{j}", "attn"))
        if i < levels - 1:
            out.append((f"downsamplers.{i}.conv", f"down_blocks.{i}.downsamplers.0.conv", "plain"))
    out += [("mid1", "mid_block.resnets.0", "res"), ("mid_attn", "mid_block.attentions.0", "attn"),
            ("mid2", "mid_block.resnets.1", "res")]
    for k in range(levels):
        i = levels - 1 - k
        attn = m.image_size // 2**i in m.attention_resolutions
        for j in range(m.num_res_blocks + 1):
            out.append((f"up.{k}.blocks.{j}", f"up_blocks.{k}.resnets.{j}", "res"))
            if attn:
                out.append((f"up.{k}.attn.{j}", f"up_blocks.{k}.attentions.{j}", "attn"))
        if i > 0:
            out.append((f"upsamplers.{k}.conv", f"up_blocks.{k}.upsamplers.0.conv", "plain"))
    out += [("norm_out", "conv_norm_out", "plain"), ("conv_out", "conv_out", "plain")]
    return out


_RES = (("norm1", "norm1"), ("conv1", "conv1"), ("emb", "time_emb_proj"), ("norm2", "norm2"), ("conv2", "conv2"),
        ("skip", "conv_shortcut"))
# Old diffusers checkpoints (AttentionBlock, before 0.14) name the projections query/key/value/proj_attn.
_OLD_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def state_dict_from_diffusers(tensors: dict[str, Tensor], m: ModelSpec, where: str) -> dict[str, Tensor]:
    """UNet2DModel weights -> ddpmctl UNet weights for spec ``m`` (from :func:`model_spec_from_unet_config`).

    Attention: ddpmctl's qkv 1x1 convolution is [to_q | to_k | to_v] stacked (heads contiguous inside each,
    as diffusers splits them) and proj is to_out.0. scale_shift blocks: diffusers' norm2 is affine, ddpmctl's
    is not; its weight w and bias b are folded into the time projection, exactly:
    (1 + s) (w n + b) + h = (1 + s') n + h' with s' = w (1 + s) - 1 and h' = h + b (1 + s).
    """
    import torch

    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in tensors:
            raise UsageError(f"{where}: missing tensor {name!r}: the weights do not fit the config")
        used.add(name)
        return tensors[name].float()

    def attn_take(prefix: str, new: str, suffix: str) -> Tensor:
        name = f"{prefix}.{new}.{suffix}"
        old = f"{prefix}.{_OLD_ATTN[new]}.{suffix}"
        return take(name if name in tensors or old not in tensors else old)

    add = m.time_injection == "add"
    out: dict[str, Tensor] = {}
    for ours, theirs, kind in _modules(m):
        if kind == "plain":
            for p in ("weight", "bias"):
                out[f"{ours}.{p}"] = take(f"{theirs}.{p}")
        elif kind == "res":
            for a, b in _RES:
                if a == "skip" and f"{theirs}.conv_shortcut.weight" not in tensors:
                    continue
                if a == "norm2" and not add:
                    continue
                for p in ("weight", "bias"):
                    out[f"{ours}.{a}.{p}"] = take(f"{theirs}.{b}.{p}")
            if not add:  # fold the affine norm2 into the scale/shift projection
                w, b = take(f"{theirs}.norm2.weight"), take(f"{theirs}.norm2.bias")
                W, B = out[f"{ours}.emb.weight"], out[f"{ours}.emb.bias"]
                c = w.numel()
                Ws, Wh, Bs, Bh = W[:c], W[c:], B[:c], B[c:]
                out[f"{ours}.emb.weight"] = torch.cat([w[:, None] * Ws, Wh + b[:, None] * Ws])
                out[f"{ours}.emb.bias"] = torch.cat([w * (1 + Bs) - 1, Bh + b * (1 + Bs)])
        else:
            out[f"{ours}.norm.weight"] = take(f"{theirs}.group_norm.weight")
            out[f"{ours}.norm.bias"] = take(f"{theirs}.group_norm.bias")
            qkv_w = torch.cat([attn_take(theirs, n, "weight") for n in ("to_q", "to_k", "to_v")])
            out[f"{ours}.qkv.weight"] = qkv_w[:, :, None, None]
            out[f"{ours}.qkv.bias"] = torch.cat([attn_take(theirs, n, "bias") for n in ("to_q", "to_k", "to_v")])
            proj = attn_take(theirs, "to_out.0", "weight")
            out[f"{ours}.proj.weight"] = proj.reshape(*proj.shape[:2], 1, 1)
            out[f"{ours}.proj.bias"] = attn_take(theirs, "to_out.0", "bias")
    extra = sorted(set(tensors) - used)
    if extra:
        raise UsageError(f"{where}: {len(extra)} tensors have no place in the network the config describes "
                         f"(e.g. {extra[0]!r})")
    return out


def state_dict_to_diffusers(sd: dict[str, Tensor], m: ModelSpec) -> dict[str, Tensor]:
    """ddpmctl UNet weights -> UNet2DModel weights for :func:`unet_config_from_spec` (m); a scale_shift
    block's norm2 (not affine in ddpmctl) is written as weight 1, bias 0."""
    import torch

    add = m.time_injection == "add"
    out: dict[str, Tensor] = {}
    for ours, theirs, kind in _modules(m):
        if kind == "plain":
            for p in ("weight", "bias"):
                out[f"{theirs}.{p}"] = sd[f"{ours}.{p}"]
        elif kind == "res":
            for a, b in _RES:
                if a == "skip" and f"{ours}.skip.weight" not in sd:
                    continue
                if a == "norm2" and not add:
                    n = sd[f"{ours}.conv2.bias"].numel()
                    like = sd[f"{ours}.conv2.bias"]
                    out[f"{theirs}.norm2.weight"] = torch.ones(n, dtype=like.dtype)
                    out[f"{theirs}.norm2.bias"] = torch.zeros(n, dtype=like.dtype)
                    continue
                for p in ("weight", "bias"):
                    out[f"{theirs}.{b}.{p}"] = sd[f"{ours}.{a}.{p}"]
        else:
            out[f"{theirs}.group_norm.weight"] = sd[f"{ours}.norm.weight"]
            out[f"{theirs}.group_norm.bias"] = sd[f"{ours}.norm.bias"]
            w, b = sd[f"{ours}.qkv.weight"], sd[f"{ours}.qkv.bias"]
            c = w.shape[1]
            for n, wi, bi in zip(("to_q", "to_k", "to_v"), w.reshape(3 * c, c).chunk(3), b.chunk(3)):
                out[f"{theirs}.{n}.weight"], out[f"{theirs}.{n}.bias"] = wi, bi
            out[f"{theirs}.to_out.0.weight"] = sd[f"{ours}.proj.weight"].reshape(c, c)
            out[f"{theirs}.to_out.0.bias"] = sd[f"{ours}.proj.bias"]
    return {k: v.contiguous() for k, v in out.items()}
