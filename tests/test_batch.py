"""The img2img Batch tab: one `p` for a folder of images of mixed sizes, aspect ratios and
modes. Each image must be planned, tiled and pasted (Keep pixels) on its own.

`batch_tab` replays A1111 1.10's modules/img2img.py process_batch (Forge 2's is the same
here): `fix_seed` once; per image, `p.init_images = [image] * p.batch_size`, and with the
"Resize by" tab `p.width, p.height = int(w * scale_by), int(h * scale_by)` (not rounded to
8 px); then `process_images(p)` on the same `p` and the same script instance; `p.close()`
once after the folder. `process_images` replays processing.py for an img2img job: every
init image flattened onto `img2img_background_color` (RGBA), resized by the resize mode
(mode 3 "latent upscale": encoded at its own size, the latent stretched bilinearly), VAE
encoded (a latent cell is 8 x 8 px; a size not a multiple of 8 loses its last pixels),
sampled, decoded, `postprocess_image` per image, `postprocess`.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import tiled_diffusion as td

from . import conftest
from . import fake_a1111 as fake
from .test_upscale import processing

USER_SIZE = (384, 320)  # the width and height set in the img2img tab


def picture(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Flat on the left, fine detail on the right: small (skipped) tiles on one side only."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = rng.integers(40, 200, 3)
    pixels[:, width // 2 :] = rng.integers(0, 256, (height, width - width // 2, 3))
    image = Image.fromarray(pixels)
    if mode == "RGBA":  # a transparent corner: the WebUI fills it with its background colour
        alpha = np.full((height, width), 255, dtype=np.uint8)
        alpha[: height // 3, width * 3 // 4 :] = 0
        alpha[height // 3 : height // 2, width * 3 // 4 :] = 100
        image.putalpha(Image.fromarray(alpha))
    return image.convert(mode)


FOLDER = [
    picture(320, 240, 1),
    picture(200, 360, 2),  # portrait
    picture(256, 256, 3, "L"),  # greyscale
    picture(333, 211, 4, "RGBA"),  # odd size, transparency
]


def job_image(p, image: Image.Image) -> Image.Image:
    """The picture the WebUI encodes for this init image (processing.py), at the job's size."""
    flat = conftest.flatten(image, "#ffffff")
    if p.resize_mode == 3:
        return flat.resize((p.width, p.height), Image.Resampling.LANCZOS)  # what the stretched latent shows
    return conftest.resize_image(p.resize_mode, flat, p.width, p.height)


def encode(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A stand-in VAE: each full 8 x 8 px cell's mean colour (-1..1) and a zero channel."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    h, w = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
    cells = torch.nn.functional.avg_pool2d(pixels[None, :, :h, :w], 8)
    latent = torch.cat([cells, torch.zeros(1, 1, *cells.shape[-2:])], dim=1)
    if size is not None:  # resize mode 3: the latent stretched to the job's size
        latent = torch.nn.functional.interpolate(latent, size=size, mode="bilinear")
    return latent


def decode(latent: torch.Tensor) -> Image.Image:
    pixels = latent[0, :3].repeat_interleave(8, 1).repeat_interleave(8, 2)
    return Image.fromarray(
        ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).round().astype(np.uint8)
    )


def process_images(k_diffusion, state, script, p, args) -> tuple:
    """One img2img job with our script's hooks; (its job, its images)."""
    script.before_process(p, *args)
    script.process(p, *args)
    job = script.job
    latents = []
    for image in p.init_images:
        flat = conftest.flatten(image, "#ffffff")
        if p.resize_mode == 3:
            latents.append(encode(flat, (p.height // 8, p.width // 8)))
        else:
            latents.append(encode(conftest.resize_image(p.resize_mode, flat, p.width, p.height)))
    original = torch.cat(latents)
    p.sampler = fake.KDiffusionSampler(k_diffusion, fake.AnalyticSD(), state)
    script.process_before_every_sampling(p, x=original)
    noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(p.seed))
    cond, uncond = fake.conditioning(original.shape[0])
    out = p.sampler.sample_img2img(p, original, noise, cond, uncond, fake.image_cond(original.shape[0]))
    results = []
    for i in range(out.shape[0]):
        p.batch_index = i
        pp = SimpleNamespace(image=decode(out[i : i + 1]))
        script.postprocess_image(p, pp)
        results.append(pp.image)
    script.postprocess(p, None, *args)
    return job, results


def batch_tab(k_diffusion, state, script, p, folder, args, scale_by: float | None = None) -> list:
    """process_batch over a folder: the same p and script for every image."""
    done = []
    for image in folder:
        if scale_by is not None:  # the "Resize by" tab
            p.width, p.height = int(image.width * scale_by), int(image.height * scale_by)
        p.init_images = [image] * p.batch_size
        done.append(process_images(k_diffusion, state, script, p, args))
    p.close()
    return done


def user_p(batch: int = 1, resize_mode: int = 0):
    return processing(
        [FOLDER[0]], width=USER_SIZE[0], height=USER_SIZE[1], batch=batch, resize_mode=resize_mode, seed=5
    )


SETTINGS = {"enabled": True, "min_tile": 64, "max_tile": 256, "overlap": 16, "skip_below": 100}
CASES = {
    "img2img size, stretch": ({}, None, 0),
    "img2img size, crop": ({}, None, 1),
    "img2img size, latent upscale": ({}, None, 3),
    "resize by 1.3": ({}, 1.3, 0),
    "upscaler x1.5": ({"upscaler": "Lanczos", "scale_factor": 1.5}, None, 0),
    "upscaler x1.5, batch 2": ({"upscaler": "Lanczos", "scale_factor": 1.5}, None, 1),
}


def expected_size(case: str, image: Image.Image) -> tuple[int, int]:
    values, scale_by, _ = CASES[case]
    if "scale_factor" in values:
        factor = values["scale_factor"]
        return int(image.width * factor) // 8 * 8, int(image.height * factor) // 8 * 8
    if scale_by is not None:
        return int(image.width * scale_by), int(image.height * scale_by)
    return USER_SIZE


@pytest.mark.parametrize("case", CASES)
def test_every_image_of_a_batch_folder_is_planned_tiled_and_pasted_on_its_own(k_diffusion, state, case):
    values, scale_by, resize_mode = CASES[case]
    batch = 2 if "batch 2" in case else 1
    args = td.Settings(**{**SETTINGS, **values}).as_args()
    p = user_p(batch, resize_mode)
    done = batch_tab(k_diffusion, state, fake.load_script(), p, FOLDER, args, scale_by)
    if scale_by is None:  # (the "Resize by" tab leaves the last image's size on p itself)
        assert (p.width, p.height) == USER_SIZE, "the user's size is back after the folder"
    assert "close" not in vars(p)
    for image, (job, results) in zip(FOLDER, done):
        width, height = expected_size(case, image)
        assert job.plan.latent_size == (height // 8, width // 8)
        assert len(results) == batch
        assert all(result.size == (width // 8 * 8, height // 8 * 8) for result in results)
        # The same image through a job of its own: the same plan, the same pixels.
        alone = user_p(batch, resize_mode)
        alone_job, alone_results = batch_tab(
            k_diffusion, state, fake.load_script(), alone, [image], args, scale_by
        )[0]
        assert job.plan.leaves == alone_job.plan.leaves and job.plan.windows == alone_job.plan.windows
        for result, other in zip(results, alone_results):
            assert np.array_equal(np.asarray(result), np.asarray(other))
        assert_kept_pixels_are_the_images_own(job, image, results, width, height, resize_mode, values)


def assert_kept_pixels_are_the_images_own(job, image, results, width, height, resize_mode, values):
    """Inside skipped tiles (away from the blend band) the result is the init image exactly,
    as the WebUI prepared it for this job."""
    share = td.blend.kept_share(job.plan)
    assert (share == 1).any() and (share == 0).any(), "the test needs skipped and denoised tiles"
    inner = torch.nn.functional.max_pool2d(-share[None, None], 3, stride=1, padding=1)[0, 0] == -1
    keep = inner.repeat_interleave(8, 0).repeat_interleave(8, 1).numpy()
    if "upscaler" in values:  # the upscale step: the flattened image, upscaled by the resize mode
        flat = conftest.flatten(image, "#ffffff")
        image = conftest.resize_image(resize_mode, flat, width, height, values["upscaler"])
    init = job_image(SimpleNamespace(resize_mode=resize_mode, width=width, height=height), image)
    crop = np.asarray(init)[: keep.shape[0], : keep.shape[1]]
    for result in results:
        assert np.array_equal(np.asarray(result)[keep], crop[keep])
