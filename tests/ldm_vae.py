"""A stand-in for the VAE A1111 runs for SD1/SD2/SDXL (ldm's Encoder/Decoder/AutoencoderKL),
written for these tests: the same module layout and attribute names, which are all the
tiled VAE's adapter reads, and the same computation (the SD VAE architecture). Not the
host's code: A1111's own classes are exercised in the real WebUI.

Layout: conv_in; per level a ModuleList `block` of ResnetBlocks, a ModuleList `attn` and a
`downsample`/`upsample`; `mid.block_1`, `mid.attn_1`, `mid.block_2`; `norm_out`, `conv_out`.
The decoder keeps its levels in `up` indexed by level, run from the deepest.
"""

from __future__ import annotations

import torch
from torch import nn


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish. The adapter takes the activation of this name from the blocks' module."""
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels, self.use_conv_shortcut = in_channels, out_channels, False
        self.norm1, self.conv1 = group_norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2, self.dropout = group_norm(out_channels), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, temb=None) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        return (x if self.in_channels == self.out_channels else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        n, c, height, width = h.shape
        q, k, v = (conv(h).reshape(n, c, height * width) for conv in (self.q, self.k, self.v))
        weights = torch.softmax(q.transpose(1, 2) @ k / c**0.5, dim=2)  # [n, query, key]
        out = (v @ weights.transpose(1, 2)).reshape(n, c, height, width)
        return x + self.proj_out(out)


def sdp_forward(attn: AttnBlock):
    """An AttnBlock forward in the manner of A1111's default "sdp" optimisation, which
    replaces AttnBlock.forward on the instance: the block's norm and convs, torch's SDPA."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = attn.norm(x)
        q, k, v = (
            conv(h).flatten(2).transpose(1, 2)[:, None].contiguous() for conv in (attn.q, attn.k, attn.v)
        )
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)[:, 0]
        return x + attn.proj_out(out.transpose(1, 2).reshape(x.shape))

    return forward


class Downsample(nn.Module):
    """Halves the size: pad one pixel on the right and bottom, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.with_conv, self.conv = True, nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.nn.functional.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Doubles the size: nearest neighbour, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.with_conv, self.conv = True, nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


def _attention(channels: int, kind: str) -> nn.Module:
    return AttnBlock(channels) if kind == "vanilla" else nn.Identity()


def _middle(channels: int, attention: str, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = _attention(channels, attention)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(nn.Module):
    def __init__(self, *, ch, ch_mult, num_res_blocks, in_channels, z_channels, double_z=True,
                 attn_type="vanilla", dropout=0.0, **unused):  # fmt: skip
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down, channels = nn.ModuleList(), ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(channels, ch * mult, dropout))
                channels = ch * mult
            stage.attn = nn.ModuleList()  # SD's VAE has attention only in the middle
            if level != self.num_resolutions - 1:
                stage.downsample = Downsample(channels)
            self.down.append(stage)
        self.mid = _middle(channels, attn_type, dropout)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for block in stage.block:
                h = block(h)
            if level != self.num_resolutions - 1:
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, z_channels, attn_type="vanilla",
                 dropout=0.0, give_pre_end=False, tanh_out=False, **unused):  # fmt: skip
        super().__init__()
        self.num_resolutions, self.give_pre_end, self.tanh_out = len(ch_mult), give_pre_end, tanh_out
        channels = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, channels, 3, padding=1)
        self.mid = _middle(channels, attn_type, dropout)
        stages = []
        for level in reversed(range(self.num_resolutions)):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(channels, ch * ch_mult[level], dropout))
                channels = ch * ch_mult[level]
            stage.attn = nn.ModuleList()
            if level != 0:
                stage.upsample = Upsample(channels)
            stages.insert(0, stage)  # up[level]: the list is indexed by level
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_resolutions)):
            for block in self.up[level].block:
                h = block(h)
            if level != 0:
                h = self.up[level].upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(nonlinearity(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class DiagonalGaussianDistribution:
    """The posterior `encode` returns: moments split into mean and (clamped) log-variance."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn(self.mean.shape, device=self.parameters.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, ddconfig: dict, embed_dim: int):
        super().__init__()
        self.encoder, self.decoder = Encoder(**ddconfig), Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))
