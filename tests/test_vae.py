"""Tiled VAE encode/decode against the untiled VAE, on random-weight SD-architecture VAEs.

Two layouts: ldm (the layout A1111 runs, as the stand-in tests/ldm_vae.py) and diffusers. Both have
the SD 1.5 shape with fewer channels (32, 64, 64, 64), 4 latent channels, 2 resnets per
level, 32 GroupNorm groups. Run with `-s` to see the measured differences.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from tiled_diffusion import vae as tv

from . import ldm_vae

LATENT = (24, 20)  # a 192 x 160 px image
TILE = 64  # px: 8 latent px, 3 x 3 tiles
OVERLAP = 16  # px: attention windows reach 2 latent px into the neighbours
EXACT = 1e-4  # largest difference relative to the largest output value


@functools.cache
def make_vae(layout: str, attention: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if layout == "ldm":
        config = {
            "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
            "attn_type": "vanilla" if attention else "none",
        }  # fmt: skip
        return ldm_vae.AutoencoderKL(config, embed_dim=4).eval()
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64, 64, 64), layers_per_block=2, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        mid_block_add_attention=attention,
    ).eval()  # fmt: skip


@torch.no_grad()
def untiled(vae: torch.nn.Module, direction: str, x: torch.Tensor) -> torch.Tensor:
    """What the first stage returns: the image, or the moments of the posterior."""
    if direction == "decode":
        out = vae.decode(x)
        return out if isinstance(out, torch.Tensor) else out.sample
    posterior = vae.encode(x)
    return getattr(posterior, "latent_dist", posterior).parameters


def tiled(vae, direction, x, **kwargs) -> torch.Tensor:
    kwargs = {"tile": TILE, "attention_overlap": OVERLAP, **kwargs}
    return (tv.tiled_decode if direction == "decode" else tv.tiled_encode)(vae, x, **kwargs)


def vae_input(direction: str, batch: int = 1, size: tuple[int, int] = LATENT) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if direction == "decode":
        return torch.randn(batch, 4, *size, generator=generator)
    image = torch.rand(batch, 3, size[0] * 8, size[1] * 8, generator=generator) * 2 - 1
    return F.avg_pool2d(image, 5, 1, 2)  # a little spatial correlation, like a picture


def difference(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Max abs difference, the same relative to the largest reference value, and PSNR over
    the reference's range."""
    error = (out - ref).abs()
    rmse = error.square().mean().sqrt().item()
    span = (ref.max() - ref.min()).item()
    psnr = math.inf if rmse == 0 else 20 * math.log10(span / rmse)
    return {"max_abs": error.max().item(), "relative": (error.max() / ref.abs().max()).item(), "psnr": psnr}


LAYOUTS = ["ldm", "diffusers"]
DIRECTIONS = ["decode", "encode"]


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_attention_synced_tiles_equal_untiled(layout, direction):
    vae, x = make_vae(layout, attention=False), vae_input(direction)
    ref = untiled(vae, direction, x)
    out = tiled(vae, direction, x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert difference(out, ref)["relative"] < EXACT


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_window_covering_the_image_is_exact(layout, direction):
    vae, x = make_vae(layout, attention=True), vae_input(direction)
    out = tiled(vae, direction, x, attention_overlap=8 * max(LATENT))
    assert difference(out, untiled(vae, direction, x))["relative"] < EXACT


def test_batch_rows_are_normalised_separately():
    vae, x = make_vae("diffusers", attention=False), vae_input("decode", batch=2)
    x[1] *= 3  # different statistics per row
    assert difference(tiled(vae, "decode", x), untiled(vae, "decode", x))["relative"] < EXACT


def test_half_precision_tiles_are_as_close_as_the_untiled_half_vae():
    """A1111 runs the VAE in fp16 or bf16: the statistics are merged in float64 and the
    norm computed in float32, so tiling adds no error of its own to the half model's."""
    vae, x = make_vae("ldm", attention=False), vae_input("decode")
    ref = untiled(vae, "decode", x)
    half = copy.deepcopy(vae).to(torch.bfloat16)
    out = tiled(half, "decode", x.bfloat16())
    assert out.dtype == torch.bfloat16
    tiled_error = difference(out.float(), ref)["max_abs"]
    assert tiled_error < 1.2 * difference(untiled(half, "decode", x.bfloat16()).float(), ref)["max_abs"]


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_synced_groupnorm_is_closer_to_untiled(layout, direction):
    """The measurement: tiled vs untiled with GroupNorm sync on and off, with and without
    attention (the same attention windows either way)."""
    rows = {}
    for attention in (False, True):
        vae, x = make_vae(layout, attention), vae_input(direction)
        ref = untiled(vae, direction, x)
        for sync in (True, False):
            rows[attention, sync] = difference(tiled(vae, direction, x, sync_groupnorm=sync), ref)
    for (attention, sync), d in rows.items():
        on_off = f"attention={'on ' if attention else 'off'} sync={'on ' if sync else 'off'}"
        numbers = f"max abs {d['max_abs']:.2e}  relative {d['relative']:.2e}  PSNR {d['psnr']:6.1f} dB"
        print(f"\n{layout:9} {direction} {on_off}  {numbers}", end="")
    for attention in (False, True):
        on, off = rows[attention, True], rows[attention, False]
        assert on["max_abs"] < off["max_abs"] and on["psnr"] > off["psnr"]
    assert rows[False, True]["relative"] < EXACT


def test_every_module_sees_one_tile_and_its_halo():
    """Model memory is bounded by the tile: no convolution gets more than a tile plus a few
    pixels, however large the image (here 4 x 4 tiles)."""
    vae, x = make_vae("ldm", attention=True), vae_input("decode", size=(32, 32))
    whole = largest_conv_inputs(vae, lambda: untiled(vae, "decode", x))
    tiles = largest_conv_inputs(vae, lambda: tiled(vae, "decode", x))
    for name, side in tiles.items():
        # halo: 1 px around a 3x3 conv, 2 px at a downsample or an attention window
        assert side <= whole[name] // 4 + 2 * 2, (name, side, whole[name])


def largest_conv_inputs(vae, call) -> dict[str, int]:
    """The longest input side each convolution of `vae` sees during `call()`."""
    sides: dict[str, int] = {}

    def record(name):
        return lambda module, args: sides.__setitem__(name, max(sides.get(name, 0), *args[0].shape[-2:]))

    convs = [(name, m) for name, m in vae.named_modules() if isinstance(m, torch.nn.Conv2d)]
    handles = [m.register_forward_pre_hook(record(name)) for name, m in convs]
    try:
        call()
    finally:
        for handle in handles:
            handle.remove()
    return sides


def test_replaced_attention_forward_is_used():
    """A1111 replaces AttnBlock.forward (sdp, xformers, sub-quadratic): the tiles go through
    whatever forward the module has, and its norm is still synced."""
    vae = make_vae("ldm", attention=True)
    attn = vae.decoder.mid.attn_1
    sdp, calls = ldm_vae.sdp_forward(attn), []

    def sdp_forward(x):
        calls.append(x.shape)
        return sdp(x)

    x = vae_input("decode")
    ref = untiled(vae, "decode", x)
    attn.forward = sdp_forward
    try:
        out = tiled(vae, "decode", x, attention_overlap=8 * max(LATENT))
    finally:
        del attn.forward
    assert len(calls) == 9 and difference(out, ref)["relative"] < EXACT


def test_norms_are_restored_after_a_failure():
    vae, x = make_vae("diffusers", attention=True), vae_input("decode")
    conv = vae.decoder.up_blocks[1].resnets[0].conv2
    handle = conv.register_forward_hook(lambda *args: (_ for _ in ()).throw(RuntimeError("out of memory")))
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            tiled(vae, "decode", x)
    finally:
        handle.remove()
    assert not [name for name, m in vae.named_modules() if "forward" in m.__dict__]
    assert difference(tiled(vae, "decode", x), tiled(vae, "decode", x))["max_abs"] == 0


def test_encode_needs_a_multiple_of_the_scale_factor():
    with pytest.raises(ValueError, match="multiple of 8"):
        tv.tiled_encode(make_vae("ldm", attention=False), torch.zeros(1, 3, 100, 64))


def test_tile_grid_covers_the_latent_exactly():
    tiles = tv.tile_grid((24, 20), 8)
    assert len(tiles) == 9
    covered = torch.zeros(24, 20, dtype=torch.int)
    for y0, y1, x0, x1 in tiles:
        covered[y0:y1, x0:x1] += 1
        assert y1 - y0 <= 8 and x1 - x0 <= 8
    assert (covered == 1).all()


def test_should_tile_above_the_threshold_area():
    assert not tv.should_tile(1024, 1024, 1024)
    assert tv.should_tile(1032, 1024, 1024)
    assert tv.should_tile(4096, 512, 1024)
    assert not tv.should_tile(2048, 512, 1024)
