"""The tiled VAE nodes for ComfyUI, on a stand-in of ComfyUI's VAE object around the ldm VAE of
tests/ldm_vae.py (random weights, SD layout with fewer channels, attention in the middle).

The stand-in follows ComfyUI 0.3.77's comfy.sd.VAE as far as the nodes see it (no ComfyUI code
copied): `first_stage_model` (AutoencoderKL with quant convs, or AutoencodingEngine without
them as for SD3 and Flux; `encode` returns the posterior's mean), `process_input` (0..1 ->
-1..1), `process_output` (back, clamped), `vae_encode_crop_pixels` (centred crop to a multiple
of the ratio), `decode` -> [B, H, W, C] and `encode` -> [B, C, h, w], both float32 on the
output device.

References are the untiled VAE in float64: the float32 untiled VAE is itself about 1e-4 (relative)
away from it on one thread, the tiles (statistics merged in float64) 50 times less.
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from torch import nn

from tiled_diffusion.hosts import comfyui_vae
from tiled_diffusion.hosts.comfyui_vae import (
    VAE_NODE_CLASS_MAPPINGS,
    VAE_NODE_DISPLAY_NAME_MAPPINGS,
    QuadtreeVAEDecodeTiled,
    QuadtreeVAEEncodeTiled,
)
from tiled_diffusion.settings import PARAMETERS_BY_NAME

from . import ldm_vae
from .test_vae import EXACT, LATENT, difference, vae_input

TILE = 64  # px: 3 x 3 tiles over the 192 x 160 px test image; the attention window of a tile
# (ATTENTION_OVERLAP = 128 px around it) covers the whole image, so tiles equal the untiled VAE
ABOVE = 128  # px: the test image is tiled (both below the declared minimums, as in test_vae.py)


class DiagonalGaussianRegularizer(nn.Module):
    """ComfyUI's regularizer without sampling: the mean of the moments."""

    sample = False

    def forward(self, moments: torch.Tensor) -> tuple[torch.Tensor, None]:
        return moments.chunk(2, dim=1)[0], None


class FirstStage(nn.Module):
    """ComfyUI's AutoencoderKL (quant convs: SD1/SD2/SDXL) or AutoencodingEngine (none: SD3, Flux)."""

    def __init__(self, latent_channels: int = 4, quant: bool = True, attention: bool = True):
        super().__init__()
        torch.manual_seed(0)
        config = {
            "z_channels": latent_channels, "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2, 2, 2],
            "num_res_blocks": 2, "attn_type": "vanilla" if attention else "none",
        }  # fmt: skip
        self.encoder, self.decoder = ldm_vae.Encoder(**config), ldm_vae.Decoder(**config)
        self.regularization = DiagonalGaussianRegularizer()
        if quant:
            self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
            self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        if hasattr(self, "quant_conv"):
            moments = self.quant_conv(moments)
        return self.regularization(moments)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z) if hasattr(self, "post_quant_conv") else z)


class VAE:
    """comfy.sd.VAE as the nodes use it."""

    latent_dim, upscale_ratio, downscale_ratio = 2, 8, 8
    device = output_device = torch.device("cpu")

    def __init__(self, first_stage_model: nn.Module | None = None, dtype: torch.dtype = torch.float32):
        self.first_stage_model = (first_stage_model or FirstStage()).eval().to(dtype)
        self.vae_dtype, self.patcher = dtype, object()

    def memory_used_decode(self, shape, dtype) -> int:
        return 2178 * shape[2] * shape[3] * 64 * dtype.itemsize

    def memory_used_encode(self, shape, dtype) -> int:
        return 1767 * shape[2] * shape[3] * dtype.itemsize

    def process_input(self, image: torch.Tensor) -> torch.Tensor:
        return image * 2 - 1

    def process_output(self, image: torch.Tensor) -> torch.Tensor:
        return ((image + 1) / 2).clamp(0, 1)

    def vae_encode_crop_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = (pixels.shape[i] // self.downscale_ratio * self.downscale_ratio for i in (1, 2))
        top, left = (pixels.shape[1] - height) // 2, (pixels.shape[2] - width) // 2
        return pixels[:, top : top + height, left : left + width]

    @torch.no_grad()
    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        out = self.first_stage_model.decode(samples.to(self.vae_dtype)).to(self.output_device).float()
        return self.process_output(out).movedim(1, -1)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = self.vae_encode_crop_pixels(pixels).movedim(-1, 1)
        return self.first_stage_model.encode(self.process_input(pixels).to(self.vae_dtype)).float()


@pytest.fixture(autouse=True)
def comfy(monkeypatch):
    """ComfyUI's model management (the loads it is asked for), and the stand-in's Encoder and
    Decoder accepted as ComfyUI's ldm classes."""
    loads = []
    management = types.SimpleNamespace(
        load_models_gpu=lambda models, **kwargs: loads.append((models, kwargs))
    )
    monkeypatch.setitem(sys.modules, "comfy", types.SimpleNamespace(model_management=management))
    monkeypatch.setitem(sys.modules, "comfy.model_management", management)
    names = {f"{ldm_vae.__name__}.Encoder", f"{ldm_vae.__name__}.Decoder"}
    monkeypatch.setattr(comfyui_vae, "TILED_CLASSES", comfyui_vae.TILED_CLASSES | names)
    return loads


@pytest.fixture(scope="module")
def vae():
    return VAE()


def exact(vae: VAE) -> VAE:
    """The same VAE in float64."""
    return VAE(copy.deepcopy(vae.first_stage_model), dtype=torch.float64)


def latent(batch: int = 1, channels: int = 4) -> dict:
    return {"samples": torch.randn(batch, channels, *LATENT, generator=torch.Generator().manual_seed(1))}


def image(batch: int = 1, size: tuple[int, int] = (LATENT[0] * 8, LATENT[1] * 8)) -> torch.Tensor:
    """An IMAGE: [B, H, W, 3] in 0..1, a little spatially correlated."""
    pixels = (vae_input("encode", batch, (size[0] // 8 + 1, size[1] // 8 + 1)) + 1) / 2
    return pixels[..., : size[0], : size[1]].movedim(1, -1).contiguous()


def decode(vae, samples, tile_above=ABOVE) -> torch.Tensor:
    return QuadtreeVAEDecodeTiled().decode(vae, samples, vae_tile=TILE, vae_tile_above=tile_above)[0]


def encode(vae, pixels, tile_above=ABOVE) -> torch.Tensor:
    return QuadtreeVAEEncodeTiled().encode(vae, pixels, vae_tile=TILE, vae_tile_above=tile_above)[0][
        "samples"
    ]


def test_tiled_decode_equals_the_untiled_decode(vae, comfy):
    samples = latent()
    out = decode(vae, samples)
    assert difference(out, exact(vae).decode(samples["samples"]))["relative"] < EXACT
    [(models, options)] = comfy  # loaded once, whole, before the tiles
    assert models == [vae.patcher] and options["force_full_load"]


def test_tiled_encode_equals_the_untiled_encode(vae):
    pixels = image(size=(197, 166))  # cropped to 192 x 160 as ComfyUI's encode crops it
    out = encode(vae, pixels)
    assert difference(out, exact(vae).encode(pixels))["relative"] < EXACT


def test_images_up_to_the_threshold_are_untiled_and_identical(vae, comfy):
    samples, pixels = latent(), image()
    assert torch.equal(decode(vae, samples, tile_above=192), vae.decode(samples["samples"]))
    assert torch.equal(encode(vae, pixels, tile_above=192), vae.encode(pixels))
    assert comfy == []


def test_batch_rows_are_tiled_each_with_its_own_statistics(vae):
    samples, pixels = latent(batch=2), image(batch=2)
    samples["samples"][1] *= 3
    pixels[1] = pixels[1] ** 3
    assert difference(decode(vae, samples), exact(vae).decode(samples["samples"]))["relative"] < EXACT
    assert difference(encode(vae, pixels), exact(vae).encode(pixels))["relative"] < EXACT


def test_sixteen_channel_vae_without_quant_convs_is_tiled():
    """SD3's and Flux's VAE: ComfyUI's AutoencodingEngine, 16 latent channels, no quant convs."""
    vae, samples, pixels = VAE(FirstStage(latent_channels=16, quant=False)), latent(channels=16), image()
    assert difference(decode(vae, samples), exact(vae).decode(samples["samples"]))["relative"] < EXACT
    assert difference(encode(vae, pixels), exact(vae).encode(pixels))["relative"] < EXACT


def test_image_and_latent_have_comfyuis_shapes_and_dtypes():
    vae = VAE(FirstStage(attention=False), dtype=torch.bfloat16)  # a half VAE gives float32 all the same
    pixels = encode(vae, image(batch=2))
    assert pixels.shape == (2, 4, *LATENT) and pixels.dtype == torch.float32
    images = decode(vae, {"samples": pixels})
    assert images.shape == (2, LATENT[0] * 8, LATENT[1] * 8, 3) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1


def test_a_vae_of_another_layout_is_refused_with_its_class_name():
    class VideoDecoder(ldm_vae.Decoder):
        pass

    video = VAE(FirstStage(attention=False))
    video.first_stage_model.decoder.__class__ = VideoDecoder
    with pytest.raises(ValueError, match="VideoDecoder"):
        decode(video, latent())
    flux2 = VAE(FirstStage(attention=False))
    flux2.first_stage_model.bn = nn.BatchNorm2d(16)
    with pytest.raises(ValueError, match="FirstStage"):
        encode(flux2, image())


def test_inputs_carry_the_declared_names_defaults_ranges_and_tooltips():
    for node, data in ((QuadtreeVAEDecodeTiled, "samples"), (QuadtreeVAEEncodeTiled, "pixels")):
        inputs = node.INPUT_TYPES()["required"]
        assert list(inputs) == [data, "vae", "vae_tile", "vae_tile_above"]
        for name in ("vae_tile", "vae_tile_above"):
            p, (kind, options) = PARAMETERS_BY_NAME[name], inputs[name]
            assert kind == "INT" and options["default"] == p.default and options["tooltip"] == p.help
            assert (options["min"], options["max"], options["step"]) == (p.minimum, p.maximum, p.step)
    assert VAE_NODE_DISPLAY_NAME_MAPPINGS == {
        "QuadtreeVAEDecodeTiled": "Quadtree VAE Decode (Tiled)",
        "QuadtreeVAEEncodeTiled": "Quadtree VAE Encode (Tiled)",
    }
    assert set(VAE_NODE_CLASS_MAPPINGS) == set(VAE_NODE_DISPLAY_NAME_MAPPINGS)
