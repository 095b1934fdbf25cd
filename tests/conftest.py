"""Shared test fixtures: the real k-diffusion samplers, imported without their training extras."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(1)  # two OpenMP threads spin-wait on a shared 2-core machine


def _import_k_diffusion() -> types.ModuleType:
    """k_diffusion.sampling and .external without the package __init__.

    The package __init__ imports training-only modules (clip, clean-fid, ...), and
    k_diffusion.utils imports torchvision, which does not import beside the CPU torch.
    A stub of torchvision.transforms.functional stands in only while importing.
    """
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion"]
    spec = importlib.util.find_spec("k_diffusion")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = package
    stubs = {}
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        if name not in sys.modules:
            stubs[name] = sys.modules[name] = types.ModuleType(name)
    try:
        for sub in ("utils", "sampling", "external"):
            setattr(package, sub, importlib.import_module(f"k_diffusion.{sub}"))
    finally:
        for name in stubs:
            del sys.modules[name]
    return package


@pytest.fixture(scope="session")
def k_diffusion() -> types.ModuleType:
    return _import_k_diffusion()


@pytest.fixture(scope="session")
def init_image():
    """The init image of the host tests: a photo at the job size (512 x 384 px)."""
    from PIL import Image

    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(skimage_data.astronaut()).resize((512, 384), Image.Resampling.LANCZOS)


@pytest.fixture
def state(monkeypatch):
    """modules.shared.state, where the WebUI shows progress text."""

    class State(SimpleNamespace):
        def __setattr__(self, name, value):
            if name == "textinfo":
                self.textinfos.append(value)  # every progress text shown, in order
            super().__setattr__(name, value)

    tracked = State(interrupted=False, skipped=False, textinfos=[])
    modules = types.ModuleType("modules")
    modules.shared = types.ModuleType("modules.shared")
    modules.shared.state = tracked
    modules.shared.sd_upscalers = UPSCALERS
    modules.shared.opts = SimpleNamespace(img2img_background_color="#ffffff")
    modules.images = types.ModuleType("modules.images")
    modules.images.resize_image = resize_image
    modules.images.flatten = flatten
    modules.sd_samplers_common = types.ModuleType("modules.sd_samplers_common")
    modules.sd_samplers_common.InterruptedException = InterruptedException
    for name in ("shared", "images", "sd_samplers_common"):
        monkeypatch.setitem(sys.modules, f"modules.{name}", getattr(modules, name))
    monkeypatch.setitem(sys.modules, "modules", modules)
    return tracked


class InterruptedException(BaseException):
    """A1111's sd_samplers_common.InterruptedException (a BaseException there too)."""


class Upscaler:
    """An entry of A1111's shared.sd_upscalers: a name and a scaler whose upscale() enlarges by
    `scale` to a size rounded down to 8 px, as modules/upscaler.py does. Records its calls."""

    def __init__(self, name: str, resample):
        self.name, self.resample, self.data_path, self.calls = name, resample, None, []
        self.scaler = self

    def upscale(self, image, scale, data_path):
        self.calls.append((image.size, scale))
        size = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
        return image.resize(size, self.resample)


def _upscalers() -> list:
    from PIL import Image

    return [
        Upscaler("None", Image.Resampling.LANCZOS),
        Upscaler("Lanczos", Image.Resampling.LANCZOS),
        Upscaler("Nearest", Image.Resampling.NEAREST),
    ]


UPSCALERS = _upscalers()


def flatten(img, bgcolor):
    """A1111 1.10's modules.images.flatten: an RGBA image's transparency over `bgcolor`, as RGB."""
    from PIL import Image

    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, bgcolor)
        background.paste(img, mask=img)  # the alpha band is the mask
        img = background
    return img.convert("RGB")


def resize_image(resize_mode, im, width, height, upscaler_name=None):
    """The behaviour of A1111 1.10's modules.images.resize_image for modes 0 (stretch to the
    size) and 1 (scale to cover it, centre, crop the rest): enlarging goes through the named
    upscaler and then Lanczos to the exact size, shrinking is Lanczos."""
    from PIL import Image

    def scaled(image, w, h):
        factor = max(w / image.width, h / image.height)
        if upscaler_name not in (None, "None") and image.mode != "L" and factor > 1.0:
            upscaler = next((u for u in UPSCALERS if u.name == upscaler_name), UPSCALERS[0])
            image = upscaler.scaler.upscale(image, factor, upscaler.data_path)
        return image if image.size == (w, h) else image.resize((w, h), Image.Resampling.LANCZOS)

    if resize_mode == 0 or resize_mode == 2 and abs(width / height - im.width / im.height) < 0.01:
        return scaled(im, width, height)  # "resize and fill" of an image of the job's aspect
    if resize_mode != 1:
        raise NotImplementedError("the tests use resize modes 0 and 1, and 2 without filling")
    if width / height > im.width / im.height:
        inner = (width, im.height * width // im.width)
    else:
        inner = (im.width * height // im.height, height)
    out = Image.new("RGB", (width, height))
    out.paste(scaled(im, *inner), box=(width // 2 - inner[0] // 2, height // 2 - inner[1] // 2))
    return out
