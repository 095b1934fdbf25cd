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
    modules.sd_samplers_common = types.ModuleType("modules.sd_samplers_common")
    modules.sd_samplers_common.InterruptedException = InterruptedException
    for name in ("shared", "sd_samplers_common"):
        monkeypatch.setitem(sys.modules, f"modules.{name}", getattr(modules, name))
    monkeypatch.setitem(sys.modules, "modules", modules)
    return tracked


class InterruptedException(BaseException):
    """A1111's sd_samplers_common.InterruptedException (a BaseException there too)."""
