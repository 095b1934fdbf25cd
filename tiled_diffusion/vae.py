"""Tiled VAE encode and decode with the exact GroupNorm statistics of the whole image.

The encoder or decoder becomes a flat list of `Step`s (conv, norm + conv, residual add,
attention, 2x up/down sampling), each a closure over the real modules. The executor runs
one step over every tile before the next step starts (layer by layer), reading each tile
with a halo of just the step's own receptive field from the previous step's output, which
is kept whole ("parked": on the CPU when the model runs on CUDA). Therefore:

- every convolution is exact: a tile's halo holds its neighbours' true values, and at the
  image border the module's own zero padding applies, as in the untiled run;
- every GroupNorm is exact: a step's output statistics (per channel: count, mean, sum of
  squared deviations) are accumulated over the pixels each tile owns, combined over all
  tiles, and the step that normalises that output uses them (the norm module's `forward`
  is replaced on the instance for the duration of the step);
- the only difference from the untiled VAE is the attention at the lowest resolution,
  which sees a window of the tile plus `attention_overlap` pixels instead of the image;
- the model only ever sees one tile plus a few pixels: accelerator memory is bounded by
  the tile size. The parked activations (at most three buffers of one layer: a resnet
  block's input, inner activation and output) are the price of exact statistics; when
  everything runs on the CPU they are the peak, about half of the untiled one.

`sync_groupnorm=False` is the plain tiled approximation, for comparison: every GroupNorm
uses the statistics of the tile's own crop.

Layouts: ldm/sgm (`ldm.modules.diffusionmodules.model.Encoder/Decoder`, A1111's VAE for
SD1/SD2/SDXL) and diffusers (`diffusers.models.autoencoders.vae.Encoder/Decoder`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_OVERLAP = 128  # px the lowest-resolution attention sees beyond each tile (the hosts' default)
WINDOW = -1  # Step.halo of an attention step: the attention window's overlap

Tile = tuple[int, int, int, int]  # y0, y1, x0, x1 at the lowest resolution


@dataclass
class Step:
    """One layer of the network, run tile by tile: `run(crop, residual) -> output crop`.

    `crop` is the tile of buffer `src` grown by `halo` pixels (clipped at the image);
    `residual` is the same crop of buffer `residual` (or None; only where zoom is 0, and
    only read pixel by pixel: the step may overwrite it in place); the output, at
    `2**zoom` times the resolution of `src`, is cut to the tile and stored as `dst`.
    `norm` is the GroupNorm the step applies to `src`: with sync on it normalises with
    the statistics of the whole of `src`.
    """

    run: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    src: str = "x"
    dst: str = "x"
    residual: str | None = None
    halo: int = 1
    zoom: int = 0
    norm: nn.GroupNorm | None = None


def should_tile(width: int, height: int, threshold: int) -> bool:
    """Tile an image of width x height px when its area is above threshold x threshold px."""
    return width * height > threshold * threshold


@torch.no_grad()
def tiled_decode(
    vae: nn.Module,
    latent: torch.Tensor,
    tile: int = 1024,
    attention_overlap: int = 128,
    sync_groupnorm: bool = True,
    park_device: torch.device | str | None = None,
) -> torch.Tensor:
    """`vae.decode(latent)` (an autoencoder: post_quant_conv, then the decoder) or `vae(latent)`
    (a bare decoder), tile by tile. `tile` and `attention_overlap` are in output pixels."""
    steps, factor = decoder_steps(vae)
    return _tiled(steps, factor, latent, 0, tile, attention_overlap, sync_groupnorm, park_device)


@torch.no_grad()
def tiled_encode(
    vae: nn.Module,
    image: torch.Tensor,
    tile: int = 1024,
    attention_overlap: int = 128,
    sync_groupnorm: bool = True,
    park_device: torch.device | str | None = None,
) -> torch.Tensor:
    """The moments an autoencoder's `encode` wraps in its DiagonalGaussianDistribution (the
    encoder, then quant_conv), or a bare encoder's output, tile by tile. `image` is
    [N, 3, H, W] in -1..1 with H and W multiples of the VAE's scale factor (8 for SD)."""
    steps, factor = encoder_steps(vae)
    if image.shape[-2] % factor or image.shape[-1] % factor:
        raise ValueError(
            f"tiled VAE encode: image size {tuple(image.shape[-2:])} is not a multiple of {factor}"
        )
    levels = int(math.log2(factor))
    return _tiled(steps, factor, image, levels, tile, attention_overlap, sync_groupnorm, park_device)


# --- the executor -------------------------------------------------------------------------------


def _tiled(steps, factor, x, level, tile, attention_overlap, sync, park_device) -> torch.Tensor:
    tiles = tile_grid((x.shape[-2] >> level, x.shape[-1] >> level), max(1, tile // factor))
    park = torch.device(park_device) if park_device is not None else _default_park(x.device)
    out = run_steps(steps, x, tiles, level, max(0, attention_overlap // factor), sync, park)
    return out.to(x.device)  # where the untiled call returns it


def run_steps(
    steps: list[Step],
    x: torch.Tensor,
    tiles: list[Tile],
    level: int,
    overlap: int,
    sync: bool,
    park: torch.device,
) -> torch.Tensor:
    """Run `steps` layer by layer over `tiles` (at the lowest resolution) from `x`, whose
    resolution is 2**level times the lowest. Buffers live on `park`; tiles are computed on
    the device of `x`."""
    device = x.device
    buffers, levels, stats = {"x": x}, {"x": level}, {}
    for i, step in enumerate(steps):
        src, lv = buffers[step.src], levels[step.src]
        out_lv = lv + step.zoom
        halo = overlap << lv if step.halo == WINDOW else step.halo
        wanted = _next_norm(steps, i, step.dst) is not None and sync
        if sync and step.norm is not None and step.src not in stats:
            stats[step.src] = _stats_of(src, tiles, lv)
        norm = _synced(step.norm, stats[step.src]) if sync and step.norm is not None else _nothing()
        acc = ChannelStats() if wanted else None
        out = None
        with norm:
            for y0, y1, x0, x1 in tiles:
                s, t = 1 << lv, 1 << out_lv
                cy0, cy1 = max(y0 * s - halo, 0), min(y1 * s + halo, src.shape[-2])
                cx0, cx1 = max(x0 * s - halo, 0), min(x1 * s + halo, src.shape[-1])
                crop = src[:, :, cy0:cy1, cx0:cx1].to(device)
                residual = None
                if step.residual is not None:  # same resolution as src: the same crop
                    residual = buffers[step.residual][:, :, cy0:cy1, cx0:cx1].to(device)
                piece = step.run(crop, residual)
                dy, dx = _scaled(y0 * s - cy0, step.zoom), _scaled(x0 * s - cx0, step.zoom)
                piece = piece[:, :, dy : dy + (y1 - y0) * t, dx : dx + (x1 - x0) * t]
                if out is None:
                    shape = (*piece.shape[:2], (src.shape[-2] >> lv) * t, (src.shape[-1] >> lv) * t)
                    out = _output_buffer(buffers, step, shape, piece.dtype, park)
                out[:, :, y0 * t : y1 * t, x0 * t : x1 * t] = piece.to(park)
                if acc is not None:
                    acc.add(piece)
        buffers[step.dst], levels[step.dst] = out, out_lv
        if acc is not None:
            stats[step.dst] = acc
        else:
            stats.pop(step.dst, None)
        for name in list(buffers):  # free what no later step reads
            if name != step.dst and not _read_later(steps, i, name):
                del buffers[name]
    return buffers[steps[-1].dst]


def tile_grid(size: tuple[int, int], tile: int) -> list[Tile]:
    """Split an h x w grid into nearly equal tiles of at most `tile` px a side."""
    (h, w), tiles = size, []
    ny, nx = math.ceil(h / tile), math.ceil(w / tile)
    ys = [round(i * h / ny) for i in range(ny + 1)]
    xs = [round(i * w / nx) for i in range(nx + 1)]
    for y0, y1 in zip(ys, ys[1:]):
        for x0, x1 in zip(xs, xs[1:]):
            tiles.append((y0, y1, x0, x1))
    return tiles


def _scaled(n: int, zoom: int) -> int:
    return n << zoom if zoom >= 0 else n >> -zoom  # crops start on even pixels before a downsample


def _default_park(device: torch.device) -> torch.device:
    """Park whole-image activations on the CPU when the model runs on an accelerator."""
    return torch.device("cpu") if device.type != "cpu" else device


def _output_buffer(buffers, step, shape, dtype, park) -> torch.Tensor:
    """The step's output buffer. A residual the output replaces is overwritten in place: an
    owned output pixel depends on the same pixel of the residual only, which no other tile
    writes (halo pixels read after a neighbour wrote them only reach discarded outputs)."""
    old = buffers.get(step.residual) if step.residual == step.dst else None
    if old is not None and old.shape == shape and old.dtype == dtype and old.device == park:
        return old
    return torch.empty(shape, dtype=dtype, device=park)


def _read_later(steps: list[Step], i: int, name: str) -> bool:
    for step in steps[i + 1 :]:
        if name in (step.src, step.residual):
            return True
        if step.dst == name:
            return False
    return False


def _next_norm(steps: list[Step], i: int, name: str) -> nn.GroupNorm | None:
    """The norm of the next step that reads buffer `name` (its statistics are then needed)."""
    for step in steps[i + 1 :]:
        if step.src == name:
            return step.norm
        if step.dst == name:
            return None
    return None


# --- exact GroupNorm statistics -----------------------------------------------------------------


class ChannelStats:
    """Count, mean and sum of squared deviations per [sample, channel], merged over tiles
    (Chan et al.'s parallel variance, in float64)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, piece: torch.Tensor) -> None:
        n = piece.shape[-2] * piece.shape[-1]
        if n == 0:
            return
        piece = piece.float()
        mean = piece.mean((-2, -1), keepdim=True)  # two passes: twice as fast as var_mean here
        m2 = torch.linalg.vector_norm(piece - mean, dim=(-2, -1)).double().square()
        mean = mean[..., 0, 0].double()
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total

    def groups(self, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (biased) variance per [sample, group] of consecutive channels."""
        rows, channels = self.mean.shape
        mean_c = self.mean.view(rows, groups, channels // groups)
        mean = mean_c.mean(-1)
        m2 = self.m2.view(rows, groups, -1).sum(-1) + self.n * (mean_c - mean[..., None]).square().sum(-1)
        return mean, m2 / (self.n * (channels // groups))


def _stats_of(buffer: torch.Tensor, tiles: list[Tile], level: int) -> ChannelStats:
    stats, s = ChannelStats(), 1 << level
    for y0, y1, x0, x1 in tiles:
        stats.add(buffer[:, :, y0 * s : y1 * s, x0 * s : x1 * s])
    return stats


@contextmanager
def _synced(norm: nn.GroupNorm, stats: ChannelStats) -> Iterator[None]:
    """`norm` normalises with the whole image's statistics while the step runs."""
    mean, var = stats.groups(norm.num_groups)
    per_group = norm.num_channels // norm.num_groups
    scale = (var + norm.eps).rsqrt().repeat_interleave(per_group, dim=1)  # [N, C]
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    scale, shift = scale.float(), shift.float()

    def forward(x: torch.Tensor) -> torch.Tensor:
        view = (*scale.shape, *([1] * (x.dim() - 2)))
        return torch.addcmul(shift.view(view), x, scale.view(view)).to(x.dtype)  # in float32

    with _instance_attribute(norm, "forward", forward):
        yield


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _instance_attribute(owner: object, name: str, value: object) -> Iterator[None]:
    """Set an attribute on one instance, restoring what was there (or nothing) afterwards."""
    missing = object()
    before = owner.__dict__.get(name, missing)
    owner.__dict__[name] = value
    try:
        yield
    finally:
        if before is missing:
            owner.__dict__.pop(name, None)
        else:
            owner.__dict__[name] = before


# --- the two layouts as step lists --------------------------------------------------------------


def decoder_steps(vae: nn.Module) -> tuple[list[Step], int]:
    """The steps of `vae.decode` (post_quant_conv + decoder) or of a bare decoder, and the
    VAE's scale factor."""
    decoder = getattr(vae, "decoder", vae)
    steps = _conv_steps(getattr(vae, "post_quant_conv", None)) if decoder is not vae else []
    if hasattr(decoder, "mid_block"):
        steps += _diffusers_decoder(decoder)
    elif hasattr(decoder, "mid"):
        steps += _ldm_decoder(decoder)
    else:
        raise TypeError(f"tiled VAE: unknown decoder {type(decoder).__name__}")
    return steps, 1 << sum(step.zoom for step in steps)


def encoder_steps(vae: nn.Module) -> tuple[list[Step], int]:
    """The steps of an autoencoder's encoder + quant_conv, or of a bare encoder, and the
    VAE's scale factor."""
    encoder = getattr(vae, "encoder", vae)
    if hasattr(encoder, "mid_block"):
        steps = _diffusers_encoder(encoder)
    elif hasattr(encoder, "mid"):
        steps = _ldm_encoder(encoder)
    else:
        raise TypeError(f"tiled VAE: unknown encoder {type(encoder).__name__}")
    if encoder is not vae:
        steps += _conv_steps(getattr(vae, "quant_conv", None))
    return steps, 1 << -sum(step.zoom for step in steps)


def _conv_steps(conv: nn.Module | None) -> list[Step]:
    return [] if conv is None else [Step(lambda x, r: conv(x), halo=_reach(conv))]


def _reach(conv: nn.Conv2d) -> int:
    """The halo a stride-1 'same' convolution needs: its padding."""
    return int(conv.padding[0]) if isinstance(conv.padding, tuple) else (conv.kernel_size[0] - 1) // 2


def _resnet(norm1, conv1, norm2, dropout, conv2, shortcut, act, divide: float = 1.0) -> list[Step]:
    """h = conv1(act(norm1(x))); x = (shortcut(x) + conv2(dropout(act(norm2(h))))) / divide."""
    steps = [Step(lambda x, r: conv1(act(norm1(x))), dst="h", norm=norm1)]
    residual = "x"
    if shortcut is not None and _reach(shortcut) > 0:  # a 3x3 shortcut needs a halo: its own step
        steps.append(Step(lambda x, r: shortcut(x), dst="s", halo=_reach(shortcut)))
        residual, shortcut = "s", None

    def add(h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        out = (r if shortcut is None else shortcut(r)) + conv2(dropout(act(norm2(h))))
        return out if divide == 1.0 else out / divide

    steps.append(Step(add, src="h", residual=residual, norm=norm2))
    return steps


def _attention(module: nn.Module, norm: nn.Module | None) -> list[Step]:
    """Self-attention over a window (the tile plus the overlap), its own norm synced."""
    if module is None or isinstance(module, nn.Identity):
        return []
    if not isinstance(norm, nn.GroupNorm):
        raise TypeError(f"tiled VAE: attention {type(module).__name__} without a GroupNorm")
    return [Step(lambda x, r: module(x.contiguous()), halo=WINDOW, norm=norm)]  # diffusers views it


def _resample(module: nn.Module, zoom: int) -> list[Step]:
    # Up: nearest 2x then a 3x3 conv needs 1 px. Down: a stride-2 3x3 conv (ldm pads right and
    # bottom) needs 1 px, taken as 2 so that crops start on even pixels.
    return [Step(lambda x, r: module(x), halo=1 if zoom > 0 else 2, zoom=zoom)]


def _end(norm, act, conv, last: Callable = lambda x: x) -> list[Step]:
    return [Step(lambda x, r: last(conv(act(norm(x)))), norm=norm, halo=_reach(conv))]


def _ldm_act(module: nn.Module) -> Callable:
    """ldm's own `nonlinearity` (x * sigmoid(x)) from the module's source file."""
    return getattr(sys.modules.get(type(module).__module__), "nonlinearity", F.silu)


def _ldm_resnet(block: nn.Module) -> list[Step]:
    if getattr(block, "temb_proj", None) is not None:
        raise TypeError("tiled VAE: ResnetBlock with a time embedding")
    shortcut = None
    if block.in_channels != block.out_channels:
        shortcut = block.conv_shortcut if block.use_conv_shortcut else block.nin_shortcut
    act = _ldm_act(block)
    return _resnet(block.norm1, block.conv1, block.norm2, block.dropout, block.conv2, shortcut, act)


def _ldm_attention(module: nn.Module) -> list[Step]:
    return _attention(module, getattr(module, "norm", None))


def _ldm_decoder(d: nn.Module) -> list[Step]:
    steps = _conv_steps(d.conv_in)
    steps += _ldm_resnet(d.mid.block_1) + _ldm_attention(d.mid.attn_1) + _ldm_resnet(d.mid.block_2)
    for i_level in reversed(range(d.num_resolutions)):
        up = d.up[i_level]
        for i_block, block in enumerate(up.block):
            steps += _ldm_resnet(block)
            if len(up.attn) > 0:
                steps += _ldm_attention(up.attn[i_block])
        if i_level != 0:
            steps += _resample(up.upsample, +1)
    if getattr(d, "give_pre_end", False):
        return steps
    return steps + _end(d.norm_out, _ldm_act(d), d.conv_out, torch.tanh if d.tanh_out else lambda x: x)


def _ldm_encoder(e: nn.Module) -> list[Step]:
    steps = _conv_steps(e.conv_in)
    for i_level in range(e.num_resolutions):
        down = e.down[i_level]
        for i_block, block in enumerate(down.block):
            steps += _ldm_resnet(block)
            if len(down.attn) > 0:
                steps += _ldm_attention(down.attn[i_block])
        if i_level != e.num_resolutions - 1:
            steps += _resample(down.downsample, -1)
    steps += _ldm_resnet(e.mid.block_1) + _ldm_attention(e.mid.attn_1) + _ldm_resnet(e.mid.block_2)
    return steps + _end(e.norm_out, _ldm_act(e), e.conv_out)


def _diffusers_resnet(block: nn.Module) -> list[Step]:
    if block.upsample is not None or block.downsample is not None or block.time_emb_proj is not None:
        raise TypeError("tiled VAE: ResnetBlock2D with resampling or a time embedding")
    return _resnet(
        block.norm1, block.conv1, block.norm2, block.dropout, block.conv2,
        block.conv_shortcut, block.nonlinearity, block.output_scale_factor,
    )  # fmt: skip


def _diffusers_mid(mid: nn.Module) -> list[Step]:
    steps = _diffusers_resnet(mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            if attn.spatial_norm is not None or not attn.residual_connection:
                raise TypeError("tiled VAE: unsupported attention block")
            steps += _attention(attn, attn.group_norm)
        steps += _diffusers_resnet(resnet)
    return steps


def _diffusers_decoder(d: nn.Module) -> list[Step]:
    if not isinstance(d.conv_norm_out, nn.GroupNorm):
        raise TypeError("tiled VAE: decoder with a spatial norm")
    steps = _conv_steps(d.conv_in) + _diffusers_mid(d.mid_block)
    for up_block in d.up_blocks:
        for resnet in up_block.resnets:
            steps += _diffusers_resnet(resnet)
        for upsampler in up_block.upsamplers or []:
            steps += _resample(upsampler, +1)
    return steps + _end(d.conv_norm_out, d.conv_act, d.conv_out)


def _diffusers_encoder(e: nn.Module) -> list[Step]:
    steps = _conv_steps(e.conv_in)
    for down_block in e.down_blocks:
        for resnet in down_block.resnets:
            steps += _diffusers_resnet(resnet)
        for downsampler in down_block.downsamplers or []:
            steps += _resample(downsampler, -1)
    steps += _diffusers_mid(e.mid_block)
    return steps + _end(e.conv_norm_out, e.conv_act, e.conv_out)
