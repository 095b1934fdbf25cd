"""ControlNet per window in ComfyUI, with the stand-in of its sampling stack (tests/fake_comfyui.py).

The stand-in's control models are pointwise on the latent grid and the UNet adds their
output, so a tiled job with every window given its own hint crop equals ComfyUI's plain
job with the same ControlNets; a crop in the wrong place shows in the result. The hints
carry their pixel coordinates, so each control call's crops can be read back.
"""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image

from tiled_diffusion.hosts import comfyui
from tiled_diffusion.hosts.comfyui_nodes import QuadtreeTiledDiffusion, to_image

from . import fake_comfyui as fake
from .fake_controlnet import coordinate_hint
from .test_comfyui import H, W, latent_mask_of, latents, widgets

STEPS = 6


@pytest.fixture(scope="module")
def picture():
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(skimage_data.astronaut()).resize((W, H), Image.Resampling.LANCZOS)


@pytest.fixture(autouse=True)
def comfy(monkeypatch):
    for name, module in fake.comfy_modules().items():
        monkeypatch.setitem(sys.modules, name, module)


def tiled(picture, model, batch: int = 1, **values):
    samples, noise = latents(batch, 7)
    patched, plan, _ = QuadtreeTiledDiffusion().patch(
        model, to_image([picture]), {"samples": samples}, **widgets(**{"tile_batch": 2, **values})
    )
    return patched, plan, samples, noise


def controlnet(seed: int = 0, images: int = 1, strength: float = 1.0, previous=None) -> fake.ControlNet:
    net = fake.ControlNet().set_cond_hint(coordinate_hint(W, H, seed, images), strength)
    return net.set_previous_controlnet(previous)


def windows_of(plan) -> set[tuple[int, int, int, int]]:
    return {(w.x, w.y, w.w, w.h) for w in plan.windows}


def whole_latent_calls(net: fake.ControlNet) -> int:
    return sum(shape[-2:] == (H // 8, W // 8) for shape, _ in net.calls)


def test_each_window_batch_gets_the_control_of_its_own_hint_crop(k_diffusion, picture):
    model = fake.ModelPatcher(fake.BaseModel())
    patched, plan, samples, noise = tiled(picture, model, batch=2)
    net = controlnet(images=2)  # one hint per image
    out = fake.ksampler(k_diffusion, patched, samples, noise, STEPS, 1.0, control=net)
    seen = {box for call in net.control_model.boxes for box in call}
    assert len(plan.windows) > 2 and seen == windows_of(plan)
    assert all(hint[-2:] == (8 * x[-2], 8 * x[-1]) for x, hint in net.calls)
    plain = fake.ksampler(k_diffusion, model, samples, noise, STEPS, 1.0, control=controlnet(images=2))
    torch.testing.assert_close(out, plain, atol=1e-4, rtol=1e-4)
    without = fake.ksampler(k_diffusion, model, samples, noise, STEPS, 1.0)
    assert (plain - without).abs().max() > 0.1  # the control shows in the result


def test_both_controlnets_of_a_chain_get_their_crops(k_diffusion, picture):
    model = fake.ModelPatcher(fake.BaseModel())
    patched, plan, samples, noise = tiled(picture, model)
    first = controlnet(seed=1, strength=0.5)
    head = controlnet(seed=2, previous=first)
    out = fake.ksampler(k_diffusion, patched, samples, noise, STEPS, 1.0, control=head)
    for net in (head, first):
        assert {box for call in net.control_model.boxes for box in call} == windows_of(plan)
    plain = fake.ksampler(
        k_diffusion,
        model,
        samples,
        noise,
        STEPS,
        1.0,
        control=controlnet(2, previous=controlnet(1, strength=0.5)),
    )
    torch.testing.assert_close(out, plain, atol=1e-4, rtol=1e-4)


def test_the_whole_latent_control_is_never_computed(k_diffusion, picture):
    patched, plan, samples, noise = tiled(picture, fake.ModelPatcher(fake.BaseModel()))
    head = controlnet(previous=controlnet(seed=1))
    fake.ksampler(k_diffusion, patched, samples, noise, STEPS, 1.0, control=head)
    for net in (head, head.previous_controlnet):
        assert net.calls and whole_latent_calls(net) == 0
    assert max(x[-1] for x, _ in head.calls) < W // 8


def test_controlnet_state_is_restored_after_the_job_and_after_an_error(k_diffusion, picture):
    model = fake.ModelPatcher(fake.BaseModel())
    patched, _, samples, noise = tiled(picture, model)
    head = controlnet(previous=controlnet(seed=1))
    nets = [head, head.previous_controlnet]
    before = [(net.cond_hint_original, net.cond_hint, net.extra_concat_orig) for net in nets]
    fake.ksampler(k_diffusion, patched, samples, noise, STEPS, 1.0, control=head)
    assert [(net.cond_hint_original, net.cond_hint, net.extra_concat_orig) for net in nets] == before

    batches = []

    def failing(apply_model, params):
        batches.append(1)
        if len(batches) == 2:
            raise RuntimeError("out of memory")
        return apply_model(params["input"], params["timestep"], **params["c"])

    model.set_model_unet_function_wrapper(failing)
    patched, _, samples, noise = tiled(picture, model)
    with pytest.raises(RuntimeError, match="out of memory"):
        fake.ksampler(k_diffusion, patched, samples, noise, STEPS, 1.0, control=head)
    assert [(net.cond_hint_original, net.cond_hint, net.extra_concat_orig) for net in nets] == before
    assert patched.model_options["model_function_wrapper"].controlnet is None


def test_a_job_without_controlnet_is_unchanged(k_diffusion, picture):
    patched, _, samples, noise = tiled(picture, fake.ModelPatcher(fake.BaseModel()), skip_below=100)
    out = fake.ksampler(k_diffusion, patched, samples, noise, STEPS, 0.5)
    patched.wrappers = {}  # the tiled model without the wrapper that takes the ControlNets out
    assert torch.equal(out, fake.ksampler(k_diffusion, patched, samples, noise, STEPS, 0.5))


def test_skipped_tiles_stay_exact_with_a_controlnet(k_diffusion, picture):
    model = fake.ModelPatcher(fake.BaseModel())
    patched, plan, samples, noise = tiled(picture, model, skip_below=100)
    net = controlnet()
    out = fake.ksampler(k_diffusion, patched, samples, noise, STEPS, 0.5, control=net)
    plain = fake.ksampler(k_diffusion, model, samples, noise, STEPS, 0.5, control=controlnet())
    kept = ~latent_mask_of(plan, lambda leaf: not leaf.skipped)
    alone = ~latent_mask_of(plan, lambda leaf: leaf.skipped)
    assert kept.any() and alone.any()
    torch.testing.assert_close(out[..., kept], samples[..., kept], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[..., alone], plain[..., alone], atol=1e-4, rtol=1e-4)
    skipped = {(w.x, w.y, w.w, w.h) for w in plan.windows if plan.leaves[w.leaves[0]].skipped}
    assert not skipped & {box for call in net.control_model.boxes for box in call}


class T2IAdapter:
    """Stands for ComfyUI's T2IAdapter: a control that is no ControlNet model."""

    def __init__(self):
        self.cond_hint_original, self.extra_concat_orig, self.previous_controlnet = None, [], None


def test_controls_that_cannot_run_per_window_are_refused_by_name(k_diffusion, picture):
    patched, _, samples, noise = tiled(picture, fake.ModelPatcher(fake.BaseModel()))
    adapter = controlnet(previous=T2IAdapter())
    with pytest.raises(ValueError, match="'T2IAdapter' cannot run per window"):
        fake.ksampler(k_diffusion, patched, samples, noise, STEPS, 1.0, control=adapter)
    video = fake.ControlNet().set_cond_hint(torch.zeros(1, 3, 2, H, W))
    with pytest.raises(ValueError, match="the ControlNet's hint is not an image"):
        fake.ksampler(k_diffusion, patched, samples, noise, STEPS, 1.0, control=video)


def test_conditionings_with_different_controlnets_are_refused():
    wrapper = comfyui.UnetWrapper(None, torch.zeros(1, 4, 8, 8))
    conds = [[{"control": controlnet()}], [{"cross": None}]]
    with pytest.raises(RuntimeError, match="carry different ControlNets"):
        wrapper.take_control(lambda *args: None, None, conds, None, None, {})
