"""The tiled VAE hook on a fake A1111 job whose model has the real ldm VAE (small, random)."""

from __future__ import annotations

from contextlib import closing

import pytest
import torch

import tiled_diffusion as td
from tiled_diffusion import vae as tv
from tiled_diffusion.hosts import webui
from tiled_diffusion.hosts.vae_a1111 import VaeHook

from . import ldm_vae
from .conftest import InterruptedException
from .test_vae import EXACT, difference, make_vae, vae_input


class LatentDiffusion:
    """The first-stage part of ldm's LatentDiffusion (ldm/models/diffusion/ddpm.py)."""

    def __init__(self, vae):
        self.first_stage_model, self.scale_factor = vae, 0.18215

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(1.0 / self.scale_factor * z)

    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, posterior):
        return self.scale_factor * posterior.sample()


class Processing:
    """A1111's StableDiffusionProcessing, as far as the hook sees it."""

    def __init__(self, vae):
        self.sd_model, self.closed = LatentDiffusion(vae), 0

    def close(self):
        self.closed += 1


@pytest.fixture
def p():
    return Processing(make_vae("ldm", attention=False))


def conv_in_sides(module, call) -> tuple[object, list[tuple[int, int]]]:
    """What `call()` returns, and the input sizes the module's conv_in saw: one per tile."""
    sides = []
    handle = module.conv_in.register_forward_pre_hook(lambda m, args: sides.append(tuple(args[0].shape[-2:])))
    try:
        return call(), sides
    finally:
        handle.remove()


def patched(p) -> list[str]:
    vae = p.sd_model.first_stage_model
    return [
        name
        for name, owner in (("encoder", vae.encoder), ("decoder", vae.decoder))
        if "forward" in vars(owner)
    ]


@torch.no_grad()
def test_large_images_are_decoded_and_encoded_in_tiles(p):
    z, image = vae_input("decode"), vae_input("encode")  # 192 x 160 px
    model, vae = p.sd_model, p.sd_model.first_stage_model
    untiled_image = model.decode_first_stage(z)
    untiled_moments = model.encode_first_stage(image).parameters
    hook = VaeHook(p.sd_model.first_stage_model, tile=64, threshold=128).install()
    try:
        image_out, decoded = conv_in_sides(vae.decoder, lambda: model.decode_first_stage(z))
        posterior, encoded = conv_in_sides(vae.encoder, lambda: model.encode_first_stage(image))
        latent = model.get_first_stage_encoding(posterior)  # the WebUI's own sampling and scaling
    finally:
        hook.remove()
    assert len(decoded) == 9 and len(encoded) == 9
    assert isinstance(posterior, ldm_vae.DiagonalGaussianDistribution) and latent.shape == (1, 4, 24, 20)
    assert difference(image_out, untiled_image)["relative"] < EXACT
    assert difference(posterior.parameters, untiled_moments)["relative"] < EXACT


@torch.no_grad()
def test_images_up_to_the_threshold_stay_untiled(p):
    hook = VaeHook(p.sd_model.first_stage_model, tile=64, threshold=192).install()
    vae = p.sd_model.first_stage_model
    try:
        sides = conv_in_sides(vae.decoder, lambda: p.sd_model.decode_first_stage(vae_input("decode")))[1]
        sides += conv_in_sides(vae.encoder, lambda: p.sd_model.encode_first_stage(vae_input("encode")))[1]
        odd = torch.zeros(1, 3, 196, 160)  # not a multiple of 8: untiled whatever its size
        hook.threshold = 64
        sides += conv_in_sides(vae.encoder, lambda: p.sd_model.encode_first_stage(odd))[1]
    finally:
        hook.remove()
    assert sides == [(24, 20), (192, 160), (196, 160)]


@torch.no_grad()
def test_lowvram_wrappers_around_encode_and_decode_still_run(p):
    """--medvram/--lowvram replace first_stage_model.encode/decode on the instance to move
    the VAE to the GPU first; the hook works under them and leaves them in place."""
    vae, calls = p.sd_model.first_stage_model, []
    encode, decode = vae.encode, vae.decode
    vae.encode = lambda x: calls.append("encode") or encode(x)
    vae.decode = lambda z: calls.append("decode") or decode(z)
    try:
        hook = VaeHook(p.sd_model.first_stage_model, tile=64, threshold=128).install()
        sides = conv_in_sides(vae.decoder, lambda: p.sd_model.decode_first_stage(vae_input("decode")))[1]
        p.sd_model.encode_first_stage(vae_input("encode"))
        hook.remove()
        assert calls == ["decode", "encode"] and len(sides) == 9
        assert "encode" in vars(vae) and "decode" in vars(vae) and not patched(p)
    finally:
        del vae.encode, vae.decode


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), InterruptedException()])
def test_closing_the_job_removes_the_hook(state, p, error):
    """A1111 runs every job inside `with closing(p)`: an exception or an interrupt in the
    job still ends with the hook removed and the job's own close() called."""
    with pytest.raises(type(error)), closing(p):
        webui.prepare(p, td.Settings(enabled=True).as_args())  # the script's before_process
        assert patched(p) == ["encoder", "decoder"]
        raise error
    assert not patched(p) and "close" not in vars(p) and p.closed == 1


def test_the_hook_lives_for_one_job_and_only_when_asked_for(state, p):
    preparation = webui.prepare(p, td.Settings(enabled=True).as_args())
    assert patched(p) == ["encoder", "decoder"]
    preparation.undo()  # the script's postprocess
    assert not patched(p) and "close" not in vars(p)
    webui.prepare(p, td.Settings(enabled=True, tiled_vae=False).as_args())
    assert webui.prepare(p, td.Settings(enabled=False).as_args()) is None
    assert not patched(p)


def test_remove_restores_earlier_instance_forwards(p):
    decoder = p.sd_model.first_stage_model.decoder
    earlier = decoder.forward
    decoder.forward = earlier  # e.g. another extension's hook, on the instance too
    try:
        hook = VaeHook(p.sd_model.first_stage_model, tile=64, threshold=128).install()
        assert vars(decoder)["forward"] is not earlier
        hook.remove()
        hook.remove()  # twice is harmless
        assert vars(decoder)["forward"] is earlier and patched(p) == ["decoder"]
    finally:
        del decoder.forward


def test_the_hook_uses_the_vae_scale_factor(p):
    hook = VaeHook(p.sd_model.first_stage_model, tile=64, threshold=128)
    assert hook.factor == 8 == tv.encoder_steps(p.sd_model.first_stage_model)[1]
