"""The Forge adapter with Forge's UNet patcher, wrapper call pattern and row layout.

The stand-ins follow DESIGN.md section 4 and Forge 2's sampling_function: each call
stacks whole-batch chunks, uncond first (`cond_or_uncond == [1, 0]`), or one chunk per
call; `c` holds `c_crossattn` and a `transformer_options` dict with per-row marks; the
model function returns x0; `clone()` deep-copies the model options.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import tiled_diffusion as td
from tiled_diffusion.hosts import webui

from . import fake_a1111 as fake
from .test_hosts_a1111 import H, W, args, assert_tiles_of_strength_match, latents, skipped_mask

COND, UNCOND = 0, 1


class KModel:
    """Forge's model function: apply_model(x, sigma, **c) -> x0 (pixel-wise posterior mean)."""

    def __init__(self, mu=0.2, spread=0.5):
        self.mu, self.spread, self.shapes = mu, spread, []

    def apply_model(self, x, t, c_crossattn, transformer_options, **kwargs):
        self.shapes.append(tuple(x.shape))
        marks = transformer_options["cond_mark"]
        assert marks.shape[0] == x.shape[0] == c_crossattn.shape[0] == t.shape[0]
        assert sorted(transformer_options["cond_indices"] + transformer_options["uncond_indices"]) == list(
            range(x.shape[0])
        )
        centre = self.mu + c_crossattn[:, :1, :1].unsqueeze(-1)
        if kwargs.get("control") is not None:  # Forge's UNet adds the control it is given
            shift = kwargs["control"]["middle"][0]
            assert shift.shape[0] in (1, x.shape[0]) and shift.shape[-2:] == x.shape[-2:]
            centre = centre + shift
        s2 = self.spread**2
        return centre + s2 / (s2 + t.view(-1, 1, 1, 1) ** 2) * (x - centre)


class UnetPatcher:
    def __init__(self, model):
        self.model, self.model_options = model, {"transformer_options": {}}
        self.controlnet_linked_list = None  # the ControlNet chain's head

    def clone(self):
        twin = UnetPatcher(self.model)
        twin.model_options = copy.deepcopy(self.model_options)
        twin.controlnet_linked_list = self.controlnet_linked_list
        return twin

    def set_model_unet_function_wrapper(self, wrapper):
        self.model_options["model_function_wrapper"] = wrapper


def cfg_denoise(unet, x, sigma, cond, uncond, scale, separate):
    """Forge's sampling_function for one step: the ControlNet chain put on each condition,
    the conditioning modifiers, then calc_cond_uncond_batch: chunks of whole batches,
    uncond first, each chunk's control computed for the call before the wrapper."""
    conds = [{"text": text} for text in (uncond, cond)]
    if unet.controlnet_linked_list is not None:
        for entry in conds:
            entry["control"] = unet.controlnet_linked_list
    for modifier in unet.model_options.get("conditioning_modifiers", []):
        *_, uncond_list, cond_list, _, _, _ = modifier(
            unet.model, x, sigma, [conds[0]], [conds[1]], scale, {}, 0
        )
        conds = [uncond_list[0], cond_list[0]]
    chunks = [(UNCOND, conds[0]["text"]), (COND, conds[1]["text"])]
    controls = {UNCOND: conds[0].get("control"), COND: conds[1].get("control")}
    groups = [[c] for c in chunks] if separate else [chunks]
    out = {}
    for group in groups:
        kinds = [kind for kind, _ in group]
        rows = x.shape[0]
        marks = [kind for kind in kinds for _ in range(rows)]
        options = {
            **unet.model_options["transformer_options"],
            "cond_or_uncond": kinds,
            "cond_mark": torch.tensor(marks, dtype=torch.float32),
            "cond_indices": [i for i, m in enumerate(marks) if m == COND],
            "uncond_indices": [i for i, m in enumerate(marks) if m == UNCOND],
        }
        c = {"c_crossattn": torch.cat([text for _, text in group]), "transformer_options": options}
        input_x, timestep = torch.cat([x] * len(group)), torch.cat([sigma] * len(group))
        control = controls[kinds[-1]]  # Forge takes the last chunk's
        if control is not None:
            for net in control.chain():
                net.transformer_options = options
            c["control"] = control.get_control(input_x, timestep, dict(c), len(kinds))
            c["control_model"] = control
        wrapper = unet.model_options.get("model_function_wrapper")
        if wrapper:
            result = wrapper(
                unet.model.apply_model,
                {"input": input_x, "timestep": timestep, "c": c, "cond_or_uncond": kinds},
            )
        else:
            result = unet.model.apply_model(input_x, timestep, **c)
        out.update(zip(kinds, result.chunk(len(group))))
    return out[UNCOND] + (out[COND] - out[UNCOND]) * scale


class ForgeSampler:
    def __init__(self, k_diffusion, p, separate=False):
        self.k_diffusion, self.p, self.separate = k_diffusion, p, separate

    def get_sigmas(self, p, steps):
        return fake.karras(steps)

    def sample_img2img(self, p, x, noise, cond, uncond):
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        schedule = self.get_sigmas(p, steps)[steps - t_enc - 1 :]
        unet = p.sd_model.forge_objects.unet

        nmask = getattr(p, "nmask", None)

        def model(x, sigma):
            if nmask is None:
                return cfg_denoise(unet, x, sigma, cond, uncond, p.cfg_scale, self.separate)
            # Forge's inpainting: the kept area re-noised from the original before each step,
            # and the original blended back after it
            kept = 1 - nmask
            x = x * nmask + (original + sigma.view(-1, 1, 1, 1) * torch.randn_like(original)) * kept
            return (
                cfg_denoise(unet, x, sigma, cond, uncond, p.cfg_scale, self.separate) * nmask
                + original * kept
            )

        original = x

        return self.k_diffusion.sampling.sample_euler(model, x + noise * schedule[0], schedule, disable=True)


def forge_processing(k_diffusion, image, batch=1, separate=False, previous_wrapper=None, **fields):
    p = fake.processing([image] if image else None, W, H, batch, **fields)
    unet = UnetPatcher(KModel())
    if previous_wrapper:
        unet.set_model_unet_function_wrapper(previous_wrapper)
    p.sd_model = SimpleNamespace(forge_objects=SimpleNamespace(unet=unet))
    p.sd_model.forge_objects_original = unet
    p.sampler = ForgeSampler(k_diffusion, p, separate)
    return p


def run_forge(p, job_args, original, noise):
    """One Forge job: forge_objects restored from the original, then the script hooks."""
    p.sd_model.forge_objects.unet = p.sd_model.forge_objects_original
    job = webui.start(p, job_args)
    if job:
        job.before_sampling(p, original)
    cond, uncond = fake.conditioning(original.shape[0])
    out = p.sampler.sample_img2img(p, original, noise, cond, uncond)
    if job:
        job.finish()
    return out, job


@pytest.mark.parametrize("separate", [False, True])
def test_forge_img2img_keeps_skipped_tiles_and_matches_untiled_elsewhere(k_diffusion, init_image, separate):
    original, noise = latents(2, 11)
    p = forge_processing(k_diffusion, init_image, batch=2, separate=separate)
    out, job = run_forge(p, args(skip_below=100), original, noise)
    plain, _ = run_forge(forge_processing(k_diffusion, init_image, 2, separate), [False], original, noise)
    skipped = skipped_mask(job.plan)
    assert 0 < skipped.float().mean() < 1
    torch.testing.assert_close(out[..., skipped], original[..., skipped], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[..., ~skipped], plain[..., ~skipped], atol=1e-4, rtol=1e-4)
    shapes = p.sd_model.forge_objects_original.model.shapes
    assert shapes and max(s[-1] for s in shapes) < W // 8, "the model saw tiles"


def test_forge_chains_the_wrapper_installed_before_it(k_diffusion, init_image):
    seen = []

    def previous(model_function, params):
        seen.append(tuple(params["input"].shape))
        assert len(params["cond_or_uncond"]) == params["input"].shape[0]  # one chunk per window and kind
        return model_function(params["input"], params["timestep"], **params["c"])

    original, noise = latents(1, 12)
    p = forge_processing(k_diffusion, init_image, previous_wrapper=previous)
    out, job = run_forge(p, args(skip_below=100), original, noise)
    assert seen and max(s[-1] for s in seen) < W // 8, "the earlier wrapper runs per window batch"
    skipped = skipped_mask(job.plan)
    torch.testing.assert_close(out[..., skipped], original[..., skipped], atol=1e-4, rtol=0)


def test_forge_wrapper_is_shared_not_copied_when_the_patcher_is_cloned(k_diffusion, init_image):
    original, _ = latents(1, 13)
    p = forge_processing(k_diffusion, init_image)
    job = webui.start(p, args(skip_below=100))
    job.before_sampling(p, original)
    unet = p.sd_model.forge_objects.unet
    assert unet is not p.sd_model.forge_objects_original, "installed on a clone"
    assert "model_function_wrapper" not in p.sd_model.forge_objects_original.model_options
    wrapper = unet.model_options["model_function_wrapper"]
    assert unet.clone().model_options["model_function_wrapper"] is wrapper
    job.finish()
    assert "get_sigmas" not in vars(p.sampler)


def test_forge_variable_denoise_tiles_start_at_their_own_strength(k_diffusion, init_image):
    original, noise = latents(1, 14)
    p = forge_processing(k_diffusion, init_image, denoising_strength=0.9)
    out, job = run_forge(
        p, args(variable_denoise=True, denoise_largest=0.3, denoise_smallest=0.8), original, noise
    )
    assert p.denoising_strength == pytest.approx(0.8)
    for strength in {leaf.strength for leaf in job.plan.leaves}:
        single = forge_processing(k_diffusion, init_image, denoising_strength=strength)
        alone, _ = run_forge(single, [False], original, noise)
        assert_tiles_of_strength_match(job.plan, strength, out, alone)


def test_forge_rejected_settings_fail_the_generation(k_diffusion, init_image):
    original, noise = latents(1, 15)
    p = forge_processing(k_diffusion, init_image)
    with pytest.raises(td.SettingsError, match="overlap: 12"):
        run_forge(p, args(overlap=0)[:5] + [12], original, noise)


def test_forge_next_job_is_untouched(k_diffusion, init_image):
    original, noise = latents(1, 16)
    p = forge_processing(k_diffusion, init_image)
    run_forge(p, args(skip_below=100), original, noise)
    after, _ = run_forge(p, [False], original, noise)
    fresh, _ = run_forge(forge_processing(k_diffusion, init_image), [False], original, noise)
    torch.testing.assert_close(after, fresh)


@pytest.fixture
def memory_management(monkeypatch):
    """Forge's backend.memory_management, as far as its tiled-VAE switch goes."""
    import sys
    import types

    backend = types.ModuleType("backend")
    backend.memory_management = types.ModuleType("backend.memory_management")
    backend.memory_management.VAE_ALWAYS_TILED = False
    monkeypatch.setitem(sys.modules, "backend", backend)
    monkeypatch.setitem(sys.modules, "backend.memory_management", backend.memory_management)
    return backend.memory_management


class Closing:
    """What A1111 and Forge do around a job's p: `with closing(p)` calls p.close()."""

    def __init__(self):
        self.closed = 0

    def close(self):
        self.closed += 1


@pytest.mark.parametrize("size, tiled", [(1024, False), (2048, True)])
def test_forge_large_jobs_use_forge_tiled_vae_for_the_job_only(
    k_diffusion, state, init_image, memory_management, size, tiled
):
    p = forge_processing(k_diffusion, init_image)
    p.width = p.height = size
    p.close = Closing().close
    script = fake.load_script()
    script.before_process(p, *args())
    script.process(p, *args())
    assert memory_management.VAE_ALWAYS_TILED is tiled  # set before the init image is encoded
    assert any("Forge's tiled VAE" in text for text in p.comments) is tiled
    script.postprocess(p, None, *args())
    assert memory_management.VAE_ALWAYS_TILED is False


def test_forge_tiled_vae_is_given_back_when_the_job_fails_and_keeps_never_oom(
    k_diffusion, state, init_image, memory_management
):
    p = forge_processing(k_diffusion, init_image)
    p.width = p.height = 2048
    closing = Closing()
    p.close = closing.close
    script = fake.load_script()
    script.before_process(p, *args())
    script.process(p, *args())
    assert memory_management.VAE_ALWAYS_TILED is True
    p.close()  # the job raised: no postprocess, but the WebUI closes p
    assert memory_management.VAE_ALWAYS_TILED is False and closing.closed == 1
    memory_management.VAE_ALWAYS_TILED = True  # Forge's "Never OOM" asked for it itself
    script.before_process(p, *args(tiled_vae=False))
    script.process(p, *args(tiled_vae=False))
    script.postprocess(p, None, *args(tiled_vae=False))
    assert memory_management.VAE_ALWAYS_TILED is True
