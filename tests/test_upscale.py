"""The upscale step: init images enlarged by a WebUI upscaler before the job, then given back."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import tiled_diffusion as td
from tiled_diffusion.hosts import webui
from tiled_diffusion.hosts.api import payload_error
from tiled_diffusion.settings import TITLE
from tiled_diffusion.ui import preview_tiles

from . import conftest
from . import fake_a1111 as fake
from .fake_webui_infotext import Component, gradio


class Processing(SimpleNamespace):
    """A1111's processing object as far as the upscale step goes: fields, and close()."""

    def close(self):
        self.closed += 1


def processing(images, **fields) -> Processing:
    return Processing(**vars(fake.processing(images, **fields)), closed=0)


def args(**values) -> list:
    return td.Settings(**{"enabled": True, "upscaler": "Lanczos", **values}).as_args()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)


@pytest.fixture
def upscalers(state):
    for upscaler in conftest.UPSCALERS:
        upscaler.calls.clear()
    return {upscaler.name: upscaler for upscaler in conftest.UPSCALERS}


@pytest.mark.parametrize("scale, size", [(2.0, (600, 400)), (1.5, (448, 296)), (3.3, (984, 656))])
def test_every_init_image_is_upscaled_and_the_job_takes_the_new_size(upscalers, scale, size):
    first, second = photo(300, 200), photo(300, 200, seed=1)
    p = processing([first, second], width=512, height=512)
    script = fake.load_script()
    script.before_process(p, *args(scale_factor=scale))
    assert (p.width, p.height) == size, "image size x scale, rounded down to 8 px"
    assert [image.size for image in p.init_images] == [size, size]
    assert [call[0] for call in upscalers["Lanczos"].calls] == [(300, 200), (300, 200)]
    # What the WebUI does next (processing.py: resize every init image to p's size) changes nothing.
    for image in p.init_images:
        assert np.array_equal(
            np.asarray(conftest.resize_image(p.resize_mode, image, p.width, p.height)), image
        )
    script.process(p, *args(scale_factor=scale))
    assert script.job.plan.latent_size == (size[1] // 8, size[0] // 8), "the plan is at the upscaled size"
    assert p.extra_generation_params["Quadtree upscaler"] == "Lanczos"
    assert p.extra_generation_params["Quadtree scale factor"] == scale


def test_the_chosen_upscaler_does_the_work(upscalers):
    p = processing([photo(100, 60)])
    fake.load_script().before_process(p, *args(upscaler="Nearest", scale_factor=4))
    assert upscalers["Nearest"].calls == [((100, 60), 4.0)] and not upscalers["Lanczos"].calls
    assert p.init_images[0].size == (400, 240)


def test_init_images_of_another_shape_are_fitted_by_the_resize_mode(upscalers):
    p = processing([photo(300, 200), photo(200, 200, seed=2)], resize_mode=1)
    fake.load_script().before_process(p, *args(scale_factor=2))
    assert [image.size for image in p.init_images] == [(600, 400), (600, 400)]  # the second cropped


def test_latent_upscale_resize_mode_still_upscales_the_images(upscalers):
    p = processing([photo(300, 200)], resize_mode=3)  # "Just resize (latent upscale)"
    fake.load_script().before_process(p, *args(scale_factor=2))
    assert p.init_images[0].size == (600, 400) and upscalers["Lanczos"].calls == [((300, 200), 2.0)]


def test_the_user_size_and_images_come_back_after_the_job(upscalers):
    images = [photo(300, 200)]
    p = processing(images, width=512, height=384)
    script = fake.load_script()
    script.before_process(p, *args())
    script.process(p, *args())
    assert p.width == 600
    script.postprocess(p, None, *args())
    assert (p.width, p.height, p.init_images) == (512, 384, images)
    assert "close" not in vars(p)
    p.close()
    assert p.closed == 1


def test_the_user_size_and_images_come_back_when_the_job_fails(upscalers):
    images = [photo(300, 200)]
    p = processing(images, width=512, height=384)
    script = fake.load_script()
    script.before_process(p, *args())
    assert p.width == 600
    # The job raises: no postprocess; the WebUI still closes p (`with closing(p)` in img2img.py).
    p.close()
    assert (p.width, p.height, p.init_images) == (512, 384, images) and p.closed == 1
    assert "close" not in vars(p)


def test_a_copy_of_p_leaves_the_original_alone(upscalers):
    """XYZ plot runs copies of p: upscaling one must not upscale the images of the next."""
    images = [photo(300, 200)]
    p = processing(images)
    cell = copy.copy(p)
    fake.load_script().before_process(cell, *args())
    assert p.init_images is images and p.init_images[0].size == (300, 200) and p.width == 512


@pytest.mark.parametrize(
    "values",
    [{"upscaler": "None"}, {"enabled": False}, {"upscaler": "Lanczos", "min_tile": 100}],
    ids=["no upscaler", "extension off", "bad settings"],
)
def test_no_upscale_step_without_an_upscaler_or_with_the_extension_off(upscalers, values):
    images = [photo(300, 200)]
    p = processing(images)
    raw = {"enabled": True, "upscaler": "Lanczos", **values}
    fake.load_script().before_process(p, raw)
    assert p.init_images is images and (p.width, p.height) == (512, 384)
    assert not upscalers["Lanczos"].calls


def test_txt2img_has_no_upscale_step(upscalers):
    p = processing(None)
    fake.load_script().before_process(p, *args())
    assert (p.width, p.height) == (512, 384) and not hasattr(p, "init_images")


def test_an_unknown_upscaler_is_refused_naming_it_and_the_choices(upscalers):
    p = processing([photo(300, 200)])
    script = fake.load_script()
    script.before_process(p, *args(upscaler="4x-UltraSharp"))
    script.process(p, *args(upscaler="4x-UltraSharp"))
    assert isinstance(script.job, webui.RejectedJob)
    message = str(script.job.error)
    assert "upscaler: '4x-UltraSharp'" in message and "'Lanczos'" in message and "'Nearest'" in message
    body = json.dumps(
        {"alwayson_scripts": {TITLE: {"args": [{"enabled": True, "upscaler": "4x-UltraSharp"}]}}}
    ).encode()
    error = payload_error(body, TITLE, webui.upscaler_names)
    assert "upscaler: '4x-UltraSharp'" in error and "'Lanczos'" in error
    assert payload_error(body.replace(b"4x-UltraSharp", b"Nearest"), TITLE, webui.upscaler_names) is None


def test_the_upscaler_control_offers_the_webui_upscalers(upscalers, monkeypatch):
    built = {}

    class Dropdown(Component):
        def __init__(self, choices, value=None, **kwargs):
            super().__init__(value=value)
            built[kwargs["elem_id"]] = choices

    monkeypatch.setattr(gradio, "Dropdown", Dropdown)
    monkeypatch.setitem(__import__("sys").modules, "gradio", gradio)
    components = fake.load_script().ui(True)
    assert len(components) == len(td.PARAMETERS)
    assert built == {"quadtree-td-img2img-upscaler": ["None", "Lanczos", "Nearest"]}


def test_preview_shows_the_plan_at_the_upscaled_size():
    values = dict(zip((p.name for p in td.PARAMETERS), args(scale_factor=1.5)))
    picture, summary = preview_tiles(photo(300, 200), 512, 512, *values.values())
    assert picture.width == 448 and "tiles" in summary  # 300 x 1.5 = 450, rounded down to 448
