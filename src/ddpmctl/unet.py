"""The U-Net denoiser: forward(x_t, t, cond) -> prediction, nothing else.

Ho et al. 2020's architecture (PixelCNN++-style residual blocks, self-attention at chosen
resolutions, encoder-decoder skips) with the residual blocks' second GroupNorm modulated by the
timestep embedding (adaptive GroupNorm, "FiLM": (1 + scale) * norm(h) + shift; Dhariwal &
Nichol 2021). The network knows nothing of the schedule or of what it predicts (eps or v).

Spec options with today's network as default express Ho et al.'s original one and diffusers'
UNet2DModel exactly (:mod:`ddpmctl.diffusersfmt`, docs/diffusers.md): ``time_injection = "add"``
(h + Linear(emb) before an affine norm2), ``time_mlp_dim``, ``sinusoid_order``, ``freq_shift``,
``norm_eps`` and ``downsample_padding = "asymmetric"``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddpmctl.cond import Cond
from ddpmctl.spec import ModelSpec


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, *, freq_shift: float = 0.0,
                       cos_first: bool = True) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, as in Ho et al.).

    Frequencies exp(-log(max_period) i / (half - freq_shift)), i < half; [cos | sin] halves, or [sin | cos]
    (Ho et al.'s order, diffusers' flip_sin_to_cos false) when not ``cos_first``.
    """
    half = dim // 2
    denom = half - freq_shift if freq_shift else half
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / denom)
    args = t.float()[:, None] * freqs[None]
    pair = (torch.cos(args), torch.sin(args)) if cos_first else (torch.sin(args), torch.cos(args))
    emb = torch.cat(pair, dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Dropout(nn.Module):
    """nn.Dropout with a cheaper mask on the CPU, the same elsewhere.

    PyTorch's CPU dropout draws one Bernoulli per element from the serial Mersenne twister (~6 ns
    each): 6-10% of an mnist training step. Here each element takes 16 random bits instead: one
    full-range 64-bit draw covers four elements, and an element is kept when its 16 bits, as an
    int16, are >= round(p * 65536) - 32768. So p is used to the nearest 1/65536 (0.1 -> 0.100006),
    and kept elements are scaled by 1 / (1 - that p): unbiased, like nn.Dropout. The mask comes from
    torch's default CPU generator, so seeding and checkpointed RNG state make it reproducible. Under
    torch.compile, and off the CPU, this is F.dropout.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return h
        if h.device.type != "cpu" or torch.compiler.is_compiling():
            return F.dropout(h, self.p, training=True)
        return h * cpu_keep_mask(h.shape, round(self.p * 65536), h.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def cpu_keep_mask(shape: torch.Size | tuple[int, ...], drop16: int, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of ``shape``: 0 with probability drop16 / 65536, else 65536 / (65536 - drop16)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # all 64 bits random
    bits = words.view(torch.int16)[:n].view(shape)
    mask = (bits >= drop16 - 32768).to(dtype)
    return mask.mul_(65536.0 / (65536 - drop16))


class ResBlock(nn.Module):
    """GN-SiLU-conv, then adaptive GN (time scale/shift)-SiLU-dropout-conv, plus a skip.

    With ``add_time`` (Ho et al. 2020): GN-SiLU-conv, + Linear(emb), then an affine GN-SiLU-dropout-conv.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int, *,
                 add_time: bool = False, eps: float = 1e-5):
        super().__init__()
        self.add_time = add_time
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch if add_time else 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps, affine=add_time)
        self.dropout = Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_silu(self.norm1(x)))
        if self.add_time:
            h = self.norm2(h + self.emb(emb)[:, :, None, None])
        else:
            scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
            # (1 + scale) * norm(h) + shift as one addcmul: one pass over h instead of two.
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        h = self.conv2(self.dropout(_silu(h)))
        # conv2's output is not saved for its backward, so adding the skip in place is autograd-safe.
        return h.add_(self.skip(x))


def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU of a fresh intermediate, in place when no gradient is recorded (inference: one buffer less)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class Attention(nn.Module):
    """Multi-head self-attention over pixels with scaled_dot_product_attention.

    The 1x1 convolutions are applied as matrix products over pixel tokens (B, HW, C), so q, k and v
    reach SDPA with a contiguous head dimension (what the flash kernels need, on CUDA and CPU) and
    a channels_last input needs no copy: (B, C, H, W) in channels_last memory *is* (B, HW, C).
    Same parameters (conv weights of shape (out, in, 1, 1)) and the same function as the convolutions.
    """

    def __init__(self, ch: int, head_channels: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        heads = self.heads
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, hgt * wid, c)  # free for channels_last
        qkv = F.linear(tokens, self.qkv.weight.view(3 * c, c), self.qkv.bias)  # (b, hw, 3c)
        q, k, v = qkv.view(b, hgt * wid, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)  # (b, heads, hw, d)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(1, 2).reshape(b, hgt * wid, c)
        out = F.linear(h, self.proj.weight.view(c, c), self.proj.bias)  # (b, hw, c)
        out = out.view(b, hgt, wid, c).permute(0, 3, 1, 2)  # (b, c, h, w) in channels_last memory
        return x + out


class Downsample(nn.Module):
    """Stride-2 3x3 convolution; ``asymmetric``: padded at the bottom and right only (TensorFlow's SAME)."""

    def __init__(self, ch: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Residual blocks (each optionally followed by attention) at one resolution."""

    def __init__(self, blocks: list[ResBlock], attn: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)


class UNet(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        ch, g, drop = spec.base_channels, spec.groups, spec.dropout
        emb_dim = spec.time_mlp_dim or spec.time_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(spec.time_embed_dim, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, emb_dim),
                                      nn.SiLU())
        eps = spec.norm_eps
        res_opts = {"add_time": spec.time_injection == "add", "eps": eps}
        # Class-conditional: one learned row per class plus the null class (row num_classes) that
        # classifier-free guidance's unconditional branch uses; added to the time embedding, so the
        # adaptive GroupNorm of every block sees it (Ho & Salimans 2022; guided-diffusion's label_emb).
        self.num_classes = spec.num_classes
        if spec.conditional:
            if not spec.classes:
                raise ValueError("a conditional network needs its class names (model.classes): they are "
                                 "filled from the data when training starts")
            self.class_emb = nn.Embedding(self.num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(spec.channels, ch, 3, padding=1)

        def attn_or_id(c: int, res: int) -> nn.Module:
            return Attention(c, spec.head_channels, g, eps) if res in spec.attention_resolutions else nn.Identity()

        # Encoder: remember the channels of every skip tensor.
        skips, res, cur = [ch], spec.image_size, ch
        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        for i, mult in enumerate(spec.channel_mult):
            out = ch * mult
            blocks, attn = [], []
            for _ in range(spec.num_res_blocks):
                blocks.append(ResBlock(cur, out, emb_dim, drop, g, **res_opts))
                attn.append(attn_or_id(out, res))
                cur = out
                skips.append(cur)
            self.down.append(Level(blocks, attn))
            last = i == len(spec.channel_mult) - 1
            self.downsamplers.append(nn.Identity() if last else
                                     Downsample(cur, spec.downsample_padding == "asymmetric"))
            if not last:
                skips.append(cur)
                res //= 2

        self.mid1 = ResBlock(cur, cur, emb_dim, drop, g, **res_opts)
        self.mid_attn = Attention(cur, spec.head_channels, g, eps)
        self.mid2 = ResBlock(cur, cur, emb_dim, drop, g, **res_opts)

        # Decoder: one more block per level than the encoder, each eating one skip.
        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i, mult in reversed(list(enumerate(spec.channel_mult))):
            out = ch * mult
            blocks, attn = [], []
            for _ in range(spec.num_res_blocks + 1):
                blocks.append(ResBlock(cur + skips.pop(), out, emb_dim, drop, g, **res_opts))
                attn.append(attn_or_id(out, res))
                cur = out
            self.up.append(Level(blocks, attn))
            first = i == 0
            self.upsamplers.append(nn.Identity() if first else Upsample(cur))
            if not first:
                res *= 2

        self.norm_out = nn.GroupNorm(g, cur, eps=eps)
        self.conv_out = nn.Conv2d(cur, spec.channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        """The prediction at (x_t, t) given ``cond`` (:mod:`ddpmctl.cond`; None: unconditional)."""
        labels = cond.labels if cond is not None else None
        sp = self.spec
        sinusoid = timestep_embedding(t, sp.time_embed_dim, freq_shift=sp.freq_shift,
                                      cos_first=sp.sinusoid_order == "cos_sin")
        emb = self.time_mlp(sinusoid.to(x.dtype))
        if self.num_classes:
            if labels is None:  # no labels: the unconditional prediction (the null class)
                labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_emb(labels).to(emb.dtype)
        elif labels is not None:
            raise ValueError("this network is unconditional: it takes no class labels")
        h = self.conv_in(x)
        hs = [h]
        for level, downsample in zip(self.down, self.downsamplers):
            for block, attn in zip(level.blocks, level.attn):
                h = attn(block(h, emb))
                hs.append(h)
            if not isinstance(downsample, nn.Identity):
                h = downsample(h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for level, upsample in zip(self.up, self.upsamplers):
            for block, attn in zip(level.blocks, level.attn):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
            h = upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(spec: ModelSpec) -> UNet:
    return UNet(spec)
