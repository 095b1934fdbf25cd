"""One job of the WebUI script, for A1111 and Forge alike: from `process` to `postprocess`.

Everything here reads the processing object `p` the two hosts share; the two ways of
hooking the denoiser live in a1111.py and forge.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..blend import paste_kept_pixels
from ..plan import Plan, build_plan
from ..quadtree import LATENT_SCALE, latent_as_image
from ..settings import TITLE, WINDOW_PROMPTS, Settings, SettingsError
from ..vae import should_tile
from . import a1111, controlnet, families, forge, vae_a1111, where, words
from .prompts import WindowConds

WORDS = WINDOW_PROMPTS[1]  # "Words where they are"

NO_ORIGINAL_NOTE = (
    f"{TITLE}: skip and variable denoise need an init image (img2img) or the hires-fix pass; "
    "this pass denoises every tile."
)


class _HookedJob:
    """Hooks installed for the current sampling pass, removed together."""

    def __init__(self) -> None:
        self.hooks: list[Any] = []

    def postprocess_image(self, p: Any, pp: Any) -> None:
        pass

    def finish(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


class Job(_HookedJob):
    """The extension's work on one generation job."""

    def __init__(self, settings: Settings, p: Any, family: families.Family | None = None):
        super().__init__()
        self.settings = settings
        self.img2img = bool(getattr(p, "init_images", None))
        self.plan: Plan | None = None
        self.pasting: list[Image.Image] = []  # init images to paste into skipped tiles
        self.family = family or families.Family("unknown")
        self.planned: tuple | None = None  # (picture, settings) the plan was built from
        self.placed_for: tuple | None = None  # the pass whose words were placed
        self.placed: dict[str, torch.Tensor] = {}  # and where (prompts.placed_masks)
        # Where the picture may change (hosts/where.py): strength per latent pixel, and the
        # strength the job runs at; known once the WebUI has prepared the mask.
        self.pixel_strength: torch.Tensor | None = None
        self.inpaint_mask: torch.Tensor | None = None  # the WebUI's repainted share, [H, W]
        self.job_strength = 1.0
        p.extra_generation_params.update(settings.infotext())
        if self.img2img:
            # The plan comes from the init image as the job resizes it; known already here,
            # so the job's strength can be set before the sampler reads it.
            images = [_resized_init_image(p, image) for image in p.init_images]
            size = (p.height // LATENT_SCALE, p.width // LATENT_SCALE)
            self._build(images[0], settings, size)
            if settings.skip_mode == "Keep pixels" and self.plan.keeps_original:
                self.pasting = images
        if settings.variable_denoise:
            strength = (
                self.plan.max_strength
                if self.plan
                else max(settings.denoise_largest, settings.denoise_smallest)
            )
            p.denoising_strength = strength  # the per-tile range replaces the img2img strength

    def _build(self, picture, settings: Settings, latent_size: tuple, placed: dict | None = None) -> None:
        self.planned = picture, settings
        self.plan = build_plan(
            picture,
            settings,
            latent_size,
            align=self.family.align,
            placed=placed,
            pixel_strength=self.pixel_strength,
            job_strength=self.job_strength,
            inpaint_mask=self.inpaint_mask,
        )

    def _find_where(self, p: Any, latent_size: tuple) -> None:
        """img2img: plan again for the inpaint mask and the strength map, and over the crop
        of an "Only masked" job, now that the WebUI has prepared them."""
        crop = where.only_masked_crop(p)
        self.pixel_strength, self.inpaint_mask = where.pixel_strength(p, self.settings, latent_size)
        self.job_strength = float(getattr(p, "denoising_strength", None) or 1.0)
        if crop is None and self.pixel_strength is None:
            return
        if crop:
            pictures = [where.cropped(p, image, crop) for image in p.init_images]
        else:
            pictures = [_resized_init_image(p, image) for image in p.init_images]
        self._build(pictures[0], self.settings, latent_size)
        self.pasting = (
            pictures if self.settings.skip_mode == "Keep pixels" and self.plan.keeps_original else []
        )

    def before_sampling(self, p: Any, x: torch.Tensor) -> None:
        """Install the tiled denoiser for the sampling pass about to start (`x`: its latent)."""
        latent_size = tuple(x.shape[-2:])
        hires = bool(getattr(p, "is_hr_pass", False))
        has_original = self.img2img or hires
        if self.img2img and self.plan is not None and self.plan.latent_size == latent_size:
            try:
                self._find_where(p, latent_size)
            except Exception as error:  # noqa: BLE001 - tiled as before, every window computed
                self.pixel_strength = self.inpaint_mask = None
                _note(p, f"{TITLE}: could not read where the picture may change ({type(error).__name__}: "
                         f"{error}); every window is computed")  # fmt: skip
        if self.plan is None or self.plan.latent_size != latent_size or hires:
            # txt2img: the hires pass starts from the upscaled first pass. A first pass has no
            # picture yet: an even grid of the largest tiles, all denoised from the start.
            if hires:
                self._build(latent_as_image(x[0]), self.settings, latent_size)
            else:
                plain = dataclasses.replace(self.settings, skip_below=0, variable_denoise=False)
                self._build(np.zeros((*latent_size, 3), dtype=np.uint8), plain, latent_size)
            self.pasting = []
        if self.settings.window_prompts == WORDS and has_original:
            self._place_words(p, x, hires)
        wanted = self.settings.skip_below > 0 or self.settings.variable_denoise
        if not has_original and wanted and not getattr(p, "enable_hr", False):
            _note(p, NO_ORIGINAL_NOTE)
        if any(leaf.prompt for leaf in self.plan.leaves):
            for window in self.plan.windows:
                prompt = self.plan.leaves[window.leaves[0]].prompt
                left, top, width, height = (
                    side * LATENT_SCALE for side in (window.x, window.y, window.w, window.h)
                )
                _log(f"window {width}x{height} px at ({left}, {top}): {prompt.describe()}")
        callbacks = {"progress": _progress, "on_note": lambda note: _note(p, note)}
        window_conds = functools.partial(WindowConds, p, hires)
        self.finish()  # the previous pass's hook (Forge also calls this twice before a hires pass)
        if _is_forge(p):
            original = x if has_original else None
            self.hooks.append(forge.install(p, self.plan, original, window_conds=window_conds, **callbacks))
        else:
            units = functools.partial(controlnet.a1111_units, p, latent_size)
            self.hooks.append(
                a1111.SamplerHook(
                    p.sampler, self.plan, controlnet=units, window_conds=window_conds, **callbacks
                ).install()
            )

    def _place_words(self, p: Any, x: torch.Tensor, hires: bool) -> None:
        """'Words where they are': place the phrases once per pass, and plan with them (again
        after a rebuild of the plan: Forge starts the hires pass twice)."""
        key = (hires, tuple(x.shape))
        if self.placed_for != key:
            self.placed_for, self.placed = key, {}
            try:
                self.placed, lines = words.place(p, x, self.family.native_side, hires)
            except Exception as error:  # noqa: BLE001 - the job goes on tiled, with the whole prompt
                _note(
                    p,
                    f"{TITLE}: could not place the prompt's words ({type(error).__name__}: {error}); "
                    "every window gets the whole prompt",
                )
                return
            for line in lines:
                _log(f"Words where they are: {line}")
        if self.placed and not any(leaf.prompt.left_out for leaf in self.plan.leaves):
            picture, settings = self.planned
            self._build(picture, settings, tuple(x.shape[-2:]), self.placed)

    def postprocess_image(self, p: Any, pp: Any) -> None:
        """Keep pixels: paste the init image back into skipped tiles, faded across the overlap."""
        if self.pasting and self.plan is not None:
            index = min(getattr(p, "batch_index", 0), len(self.pasting) - 1)
            pp.image = paste_kept_pixels(pp.image, self.pasting[index], self.plan)


class RejectedJob(_HookedJob):
    """Settings that failed validation. The WebUI swallows exceptions from `process`, which
    would run the job untiled and answer 200; raising from inside the sampler instead fails
    the generation (HTTP 500 from the API, an error in the UI)."""

    def __init__(self, error: SettingsError):
        super().__init__()
        self.error = error

    def before_sampling(self, p: Any, x: torch.Tensor) -> None:
        error = SettingsError(f"{TITLE}: {self.error}")
        self.finish()
        if _is_forge(p):
            self.hooks.append(forge.install(p, None, None))
            self.hooks[-1].error = error
        else:
            release = functools.partial(controlnet.release_a1111, p)
            self.hooks.append(a1111.FailingHook(p.sampler, error, before_failing=release).install())


def start(p: Any, args: tuple, preparation: Preparation | None = None) -> Job | RejectedJob | None:
    """The job for these script args, or None when the extension is off.

    preparation: what `prepare` did for this job; Forge's tiled VAE joins its undo steps."""
    try:
        settings = settings_of(p, args)
    except SettingsError as error:
        return RejectedJob(error)
    if not settings.enabled:
        return None
    try:  # known now: the WebUI would swallow the error where the map is placed
        where.check(p, settings)
    except SettingsError as error:
        return RejectedJob(error)
    family = families.of_job(p)
    if family.refused:  # a model the windows cannot be placed for
        return RejectedJob(SettingsError(family.refused))
    if settings.window_prompts == WORDS and not family.cross_attention:
        return RejectedJob(
            SettingsError(
                f"window_prompts: {WORDS!r} reads the model's cross-attention maps, and {family.name} "
                "has none (its text and image attend jointly); use 'Whole prompt' or regions"
            )
        )
    if _is_forge(p) and preparation is not None:
        undo = forge_tiled_vae(p, settings)
        if undo:
            preparation.undos.append(undo)
    return Job(settings, p, family)


def settings_of(p: Any, args: tuple) -> Settings:
    """The job's settings: its script args, with an X/Y/Z plot cell's values over them."""
    args = list(args)
    if args and isinstance(args[0], dict):
        # Named API args: the WebUI pads the one-dict list with the UI's defaults.
        args = args[:1]
    settings = Settings.from_args(args)
    cell = overrides_of(p)
    if cell:
        settings = dataclasses.replace(settings, **cell)  # checked again, e.g. max_tile >= 2 min_tile
    return settings.check_upscaler(upscaler_names())


# The attribute on an X/Y/Z plot cell's copy of p that holds the cell's values ({name: value}).
XYZ_OVERRIDES = "quadtree_tiled_diffusion_xyz"


def overrides_of(p: Any) -> dict[str, Any]:
    """The values an X/Y/Z plot cell sets on this job (hosts/xyz.py), or {}."""
    return dict(getattr(p, XYZ_OVERRIDES, None) or {})


def forget_overrides(p: Any) -> None:
    """Drop an X/Y/Z plot cell's values from p at the end of its job."""
    if XYZ_OVERRIDES in getattr(p, "__dict__", {}):
        delattr(p, XYZ_OVERRIDES)


def upscaler_names() -> list[str] | None:
    """The names of the WebUI's upscalers (None outside a WebUI)."""
    try:
        from modules import shared
    except ImportError:
        return None
    return [upscaler.name for upscaler in shared.sd_upscalers]


class Preparation:
    """What a job changes before the WebUI reads `p` (`before_process`), given back after it.

    Each step registers how to undo itself; `undo()` runs them last first, after the job
    (`postprocess`) and from `p.close()`, which the WebUI calls even when the job fails or
    is interrupted (`with closing(p)` in txt2img, img2img and the API).
    """

    def __init__(self, p: Any):
        self.p, self.undos = p, []
        self.own_close = vars(p).get("close")  # None: p closes with its class's method
        p.close = self._close  # an instance attribute: only this job's p

    def undo(self) -> None:
        """Undo every step (once; later calls do nothing)."""
        while self.undos:
            self.undos.pop()()
        if vars(self.p).get("close") == self._close:
            if self.own_close is None:
                del self.p.close
            else:
                self.p.close = self.own_close

    def _close(self) -> None:
        self.undo()
        self.p.close()


def prepare(p: Any, args: tuple) -> Preparation | None:
    """The steps that must run before the WebUI reads `p` (`before_process`): the upscale
    step, and in A1111 the tiled VAE; None when the extension is off or its args are bad."""
    try:
        settings = settings_of(p, args)
    except SettingsError:
        return None  # process() rejects the job with the message
    if not settings.enabled:
        return None
    preparation = Preparation(p)
    if settings.upscaler != "None" and getattr(p, "init_images", None):
        preparation.undos.append(upscale_init_images(p, settings))
    first_stage = getattr(getattr(p, "sd_model", None), "first_stage_model", None)
    if settings.tiled_vae and not _is_forge(p) and first_stage is not None:
        try:
            vae = vae_a1111.VaeHook(first_stage, settings.vae_tile, settings.vae_tile_above, _log)
        except TypeError as error:  # a VAE of another layout: the WebUI's own VAE runs
            _note(p, f"{TITLE}: no tiled VAE for this model ({error})")
        else:
            preparation.undos.append(vae.install().remove)
    return preparation


def forge_tiled_vae(p: Any, settings: Settings) -> Callable[[], None] | None:
    """Forge: its own tiled VAE for a job larger than the threshold; returns how to undo it.

    Set from `process()`, after Forge's built-in "Never OOM" script has set the same switch
    from its own checkbox (built-in scripts run first), and before the init image is encoded.
    """
    if not settings.tiled_vae or not should_tile(*_largest_job_size(p), settings.vae_tile_above):
        return None
    from backend import memory_management

    before = memory_management.VAE_ALWAYS_TILED
    memory_management.VAE_ALWAYS_TILED = True
    _note(p, f"{TITLE}: Forge's tiled VAE is on for this job")

    def undo() -> None:
        memory_management.VAE_ALWAYS_TILED = before

    return undo


def _largest_job_size(p: Any) -> tuple[int, int]:
    """(width, height) of the largest image the job encodes or decodes (the hires pass's, if any)."""
    width, height = p.width, p.height
    if getattr(p, "enable_hr", False):
        scale = getattr(p, "hr_scale", 1.0) or 1.0
        width = getattr(p, "hr_resize_x", 0) or int(width * scale)
        height = getattr(p, "hr_resize_y", 0) or int(height * scale)
    return width, height


def upscale_init_images(p: Any, settings: Settings) -> Callable[[], None]:
    """img2img: every init image upscaled by the job's upscaler; returns how to undo it.

    Runs before the WebUI resizes the init images and before every script's `process()`,
    so the plan, ControlNet and the WebUI itself all see the new size. The job's size is
    the first init image's size times the scale factor, rounded down to a multiple of 8 px
    (as the WebUI's upscalers do); other init images are fitted to it by the job's resize
    mode. Undoing gives `p` back the user's width, height and init images.
    """
    from modules import images  # the WebUI's resize, which runs its upscalers

    saved = p.width, p.height, p.init_images
    first = p.init_images[0]
    width = max(8, int(first.width * settings.scale_factor) // 8 * 8)
    height = max(8, int(first.height * settings.scale_factor) // 8 * 8)
    mode = getattr(p, "resize_mode", 0)
    mode = mode if mode in (0, 1, 2) else 0  # 3, "latent upscale": the images themselves just resized
    # A new list: XYZ plot's copies of p share the old one.
    p.init_images = [
        images.resize_image(mode, where.flattened(image), width, height, upscaler_name=settings.upscaler)
        for image in p.init_images
    ]
    p.width, p.height = width, height

    def undo() -> None:
        p.width, p.height, p.init_images = saved

    return undo


def _is_forge(p: Any) -> bool:
    return hasattr(getattr(p, "sd_model", None), "forge_objects")


def _resized_init_image(p: Any, image: Image.Image) -> Image.Image:
    """The init image as the job sees it: transparency over the WebUI's img2img background
    colour, resized by the job's resize mode (processing.py does the same before encoding)."""
    mode = getattr(p, "resize_mode", 0)
    # 3, "latent upscale": the WebUI encodes the image at its own size and stretches the latent.
    mode = mode if mode in (0, 1, 2) else 0
    try:
        from modules import images  # the WebUI's own resize (crop / fill / just resize)
    except ImportError:
        return image.convert("RGB").resize((p.width, p.height), Image.Resampling.LANCZOS)
    return images.resize_image(mode, where.flattened(image), p.width, p.height)


def _log(text: str) -> None:
    """A line in the WebUI's console."""
    print(f"{TITLE}: {text}", flush=True)


def _note(p: Any, text: str) -> None:
    """A message the user sees under the result (and in the console)."""
    print(text, flush=True)
    if hasattr(p, "comment"):
        p.comment(text)


def _progress(done: int, total: int) -> None:
    """Tile progress in the WebUI's progress text; an interrupt stops between tile batches."""
    try:
        from modules import sd_samplers_common, shared
    except ImportError:
        return
    if shared.state.interrupted or getattr(shared.state, "skipped", False):
        # The sampler checks only once per step; a big step holds many tile batches.
        raise sd_samplers_common.InterruptedException
    if total > 1:
        shared.state.textinfo = f"{TITLE}: tile {done}/{total}"
