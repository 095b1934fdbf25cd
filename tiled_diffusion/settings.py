"""Every parameter of the extension, declared once.

The WebUI controls, the API argument list (by position or by name), the infotext keys,
the command line options and the README table are all derived from `PARAMETERS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

TITLE = "Quadtree Tiled Diffusion"  # the script's title; its API name is TITLE.lower()
METHODS = ("MultiDiffusion", "Mixture of Diffusers")
SKIP_MODES = ("Keep pixels", "Keep latent")
WINDOW_PROMPTS = ("Whole prompt", "Words where they are")
# What variable denoise does to the job's strength (help text, UI note and README say this).
JOB_STRENGTH = (
    "Replaces the img2img denoising strength: the job runs at the largest strength of any tile "
    "not skipped, that is the larger of the two Denoise values, or 'Denoise at largest tiles' "
    "when the tiles not skipped are all one size."
)
BRIEF = 40  # characters of a bad value or name that an error message quotes


class SettingsError(ValueError):
    """A parameter has a wrong type, an out-of-range value or an unknown choice."""


def brief_repr(value: Any) -> str:
    """repr(value) for an error message: a long one cut to a short prefix, with its length."""
    text = repr(value)
    if len(text) <= BRIEF:
        return text
    if isinstance(value, str):
        return f"{value[:BRIEF] + '…'!r} ({len(value)} characters)"
    return f"{text[:BRIEF]}… ({len(text)} characters)"


@dataclass(frozen=True)
class Param:
    name: str
    label: str
    default: Any
    help: str
    group: str  # "tiles", "skip", "variable denoise", "prompts", "where", "upscale" or "vae": UI groups
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None
    names: str | None = None  # a text parameter whose choices only the host knows: what they are
    text: Callable[[str], Any] | None = None  # free text (may be empty): checks it, raises SettingsError
    image: bool = False  # an image (strength.StrengthMap; None = no image); its infotext is a digest

    @property
    def kind(self) -> type:
        return object if self.image else type(self.default)

    @property
    def infotext_key(self) -> str:
        label = self.label if self.label[:2].isupper() else self.label[0].lower() + self.label[1:]
        return f"Quadtree {label}"  # "Quadtree min tile", "Quadtree VAE tile"

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.names:
            return self.names
        if self.kind is bool:
            return "true or false"
        if self.text:
            return "text"
        if self.image:
            return "a greyscale image as base64 PNG or JPEG, or none"
        text = f"{'an integer' if self.kind is int else 'a number'} from {self.minimum:g} to {self.maximum:g}"
        if self.kind is int and self.step and self.step > 1:
            text += f" in steps of {self.step:g}"
        return text

    def convert(self, value: Any) -> Any:
        """Check one value and return it as the parameter's type, or raise SettingsError."""
        bad = SettingsError(f"{self.name}: {brief_repr(value)} is not allowed; expected {self.allowed()}")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad
            return value
        if self.image:
            from .strength import read_strength_map  # strength.py raises SettingsError, declared here

            return read_strength_map(value)
        if self.text:
            if not isinstance(value, str):
                raise bad
            self.text(value)
            return value
        if self.choices or self.names:
            if not isinstance(value, str) or not value or (self.choices and value not in self.choices):
                raise bad
            return value  # a host-known name: the host checks it (hosts/webui.py)
        # Numbers: gradio sliders hand back floats such as 128.0 for integer parameters.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        if self.kind is int:
            if value != int(value) or int(value) % int(self.step or 1):
                raise bad
            value = int(value)
        else:
            value = float(value)
        if not self.minimum <= value <= self.maximum:
            raise bad
        return value

    def read_infotext(self, params: dict[str, Any]) -> Any:
        """This parameter's value in parsed generation parameters (strings), or None when absent
        or unreadable. The WebUI calls this on paste and for the API's `infotext` field; given
        the key instead, the API would convert the string with the control's type, and
        bool("False") is True."""
        raw = params.get(self.infotext_key)
        if self.image:
            return None  # the infotext holds the image's digest, not the image (see strength_map)
        if raw is None and self.text and any(key.startswith("Quadtree ") for key in params):
            return ""  # a job's empty text is left out of its infotext (see Settings.infotext)
        if raw is None or self.kind is str:
            return raw
        if self.kind is bool:
            return {"True": True, "False": False}.get(raw)
        try:
            return self.kind(raw)
        except ValueError:
            return None


PARAMETERS: tuple[Param, ...] = (
    Param(
        "enabled",
        "Enabled",
        False,
        "Tile the denoiser along an adaptive quadtree of the init image.",
        "tiles",
    ),
    Param(
        "method",
        "Method",
        "Mixture of Diffusers",
        "How overlapping tiles are blended: MultiDiffusion averages them evenly; "
        "Mixture of Diffusers weights each tile by a Gaussian centred on it (softer seams).",
        "tiles",
        choices=METHODS,
    ),
    Param(
        "detail_threshold",
        "Detail threshold",
        70.0,
        "Split a tile while its share of finely detailed pixels (letters, hair, foliage, fabric, "
        "measured at full resolution; the line between two flat areas hardly counts) is above "
        "this percentage of the whole image's share. Lower = more, smaller tiles; a uniform "
        "texture gets one tile size and a smooth area the largest tiles.",
        "tiles",
        1.0,
        200.0,
        1.0,
    ),
    Param(
        "min_tile",
        "Min tile",
        128,
        "Smallest tile side in pixels: a tile is never split into halves smaller than this.",
        "tiles",
        64,
        2048,
        8,
    ),
    Param(
        "max_tile",
        "Max tile",
        512,
        "Largest tile side in pixels: larger tiles are always split. At least twice Min tile.",
        "tiles",
        128,
        4096,
        8,
    ),
    Param(
        "overlap",
        "Overlap",
        32,
        "Pixels each tile's result reaches into its neighbours, blended across (at most a "
        "quarter of the tile's shorter side): two neighbours share a band twice this wide.",
        "tiles",
        0,
        512,
        8,
    ),
    Param(
        "tile_batch",
        "Tile batch",
        4,
        "Windows of equal size evaluated in one model call (more is faster, needs more VRAM).",
        "tiles",
        1,
        32,
        1,
    ),
    Param(
        "skip_below",
        "Skip below",
        0,
        "Tiles whose shorter side is below this many pixels keep the original and cost no "
        "model call. 0 = never skip.",
        "skip",
        0,
        2048,
        1,
    ),
    Param(
        "skip_mode",
        "Skip mode",
        "Keep pixels",
        "What skipped tiles show: 'Keep pixels' pastes the init image's pixels back after "
        "decoding (exact, blended across the overlap); 'Keep latent' keeps the original latent "
        "and lets the VAE decode it like the rest.",
        "skip",
        choices=SKIP_MODES,
    ),
    Param(
        "variable_denoise",
        "Variable denoise",
        False,
        "Give each tile its own denoising strength, from 'Denoise at largest tiles' to "
        "'Denoise at smallest tiles' by tile size: by default the large flat tiles are refined "
        "and the small detailed ones kept. " + JOB_STRENGTH,
        "variable denoise",
    ),
    Param(
        "denoise_largest",
        "Denoise at largest tiles",
        0.4,
        "Denoising strength of the largest tiles (flat regions: sky, walls, skin), where a "
        "stronger refine adds texture without inventing anything.",
        "variable denoise",
        0.0,
        1.0,
        0.01,
    ),
    Param(
        "denoise_smallest",
        "Denoise at smallest tiles",
        0.1,
        "Denoising strength of the smallest tiles (detailed regions: faces, text, hair). Below "
        "'Denoise at largest tiles' (the default) keeps their detail; above it adds detail where "
        "there is detail.",
        "variable denoise",
        0.0,
        1.0,
        0.01,
    ),
    Param(
        "min_window",
        "Min window",
        256,
        "Smallest side of the model's view, in pixels: a smaller tile is denoised inside a "
        "window this large so the model sees the picture around it (only the tile and its "
        "overlap take the result). Neighbouring tiles of one strength share a window.",
        "tiles",
        0,
        2048,
        8,
    ),
    Param(
        "upscaler",
        "Upscaler",
        "None",
        "img2img: upscale every init image by 'Scale factor' with this WebUI upscaler before the "
        "job, which then runs at the upscaled size. 'None' = no upscale step (the job keeps its "
        "width and height).",
        "upscale",
        names="the name of one of the WebUI upscalers, or 'None'",
    ),
    Param(
        "scale_factor",
        "Scale factor",
        2.0,
        "How much the upscaler enlarges the init image: the job's size is the image's size times "
        "this, rounded down to a multiple of 8 px. Used only with an Upscaler.",
        "upscale",
        1.0,
        8.0,
        0.05,
    ),
    Param(
        "tiled_vae",
        "Tiled VAE",
        True,
        "Encode and decode images larger than 'VAE tiles above' tile by tile, so the VAE fits "
        "at 4K-8K. A1111: this extension's tiled VAE, exact but for the VAE's attention (its "
        "GroupNorms use the whole image's statistics); Forge: Forge's own tiled VAE.",
        "vae",
    ),
    Param(
        "vae_tile_above",
        "VAE tiles above",
        1536,
        "Tile the VAE when width x height is above this size squared, in pixels (1536: an SD "
        "VAE decode above 1536x1536 needs more than about 4.5 GB in half precision).",
        "vae",
        256,
        8192,
        64,
    ),
    Param(
        "vae_tile",
        "VAE tile",
        1024,
        "Side of a tile of the tiled VAE in pixels (A1111, ComfyUI): smaller uses less VRAM, larger gives "
        "the VAE's attention more of the picture.",
        "vae",
        256,
        4096,
        64,
    ),
    Param(
        "window_prompts",
        "Window prompts",
        "Whole prompt",
        "What each window is told. 'Whole prompt': every window gets the job's prompt. 'Words "
        "where they are': the prompt's comma-separated phrases are placed by the model's own "
        "cross-attention over the init image (one model call at the model's size before sampling); "
        "a window gets the phrases whose attention lies over it, and phrases that attend to the "
        "whole picture (style words) stay in every window, so tiles do not invent the prompt's "
        "objects where they are not.",
        "prompts",
        choices=WINDOW_PROMPTS,
    ),
    Param(
        "regions",
        "Regions",
        "",
        "One region per line, 'x0 y0 x1 y1: prompt', in fractions of the image ('0 0 0.5 1: "
        "a red barn' is the left half). A tile gets the job's prompt plus the prompt of each "
        "region that covers the tile's centre (added to every AND part); tiles with different "
        "prompts never share a window. Empty: no regions.",
        "prompts",
        text=lambda value: _check_regions(value),
    ),
    Param(
        "strength_map",
        "Strength map",
        None,
        "A greyscale picture painted over the init image: white denoises at full strength, black "
        "keeps the original exactly and costs nothing, grey is a proportionally lower strength "
        "that starts later, pixel by pixel. With variable denoise a pixel's strength is its "
        "tile's times the map. Windows with no white or grey pixel are not evaluated.",
        "where",
        image=True,
    ),
)

PARAMETERS_BY_NAME = {p.name: p for p in PARAMETERS}

# The parameters a user sweeps in the WebUI's X/Y/Z plot (hosts/xyz.py): each is an axis
# labelled "[Quadtree] <label>". Upscaler and Scale factor are img2img axes only.
XYZ_AXES = (
    "method",
    "detail_threshold",
    "min_tile",
    "max_tile",
    "overlap",
    "min_window",
    "skip_below",
    "skip_mode",
    "variable_denoise",
    "denoise_largest",
    "denoise_smallest",
    "window_prompts",
    "upscaler",
    "scale_factor",
)
XYZ_IMG2IMG_ONLY = ("upscaler", "scale_factor")


def _check_regions(text: str) -> None:
    from .prompts import parse_regions  # prompts.py raises SettingsError, declared here

    parse_regions(text)


@dataclass(frozen=True)
class Settings:
    """All user settings of one job, validated on construction."""

    enabled: bool = PARAMETERS_BY_NAME["enabled"].default
    method: str = PARAMETERS_BY_NAME["method"].default
    detail_threshold: float = PARAMETERS_BY_NAME["detail_threshold"].default
    min_tile: int = PARAMETERS_BY_NAME["min_tile"].default
    max_tile: int = PARAMETERS_BY_NAME["max_tile"].default
    overlap: int = PARAMETERS_BY_NAME["overlap"].default
    tile_batch: int = PARAMETERS_BY_NAME["tile_batch"].default
    skip_below: int = PARAMETERS_BY_NAME["skip_below"].default
    skip_mode: str = PARAMETERS_BY_NAME["skip_mode"].default
    variable_denoise: bool = PARAMETERS_BY_NAME["variable_denoise"].default
    denoise_largest: float = PARAMETERS_BY_NAME["denoise_largest"].default
    denoise_smallest: float = PARAMETERS_BY_NAME["denoise_smallest"].default
    min_window: int = PARAMETERS_BY_NAME["min_window"].default
    upscaler: str = PARAMETERS_BY_NAME["upscaler"].default
    scale_factor: float = PARAMETERS_BY_NAME["scale_factor"].default
    tiled_vae: bool = PARAMETERS_BY_NAME["tiled_vae"].default
    vae_tile_above: int = PARAMETERS_BY_NAME["vae_tile_above"].default
    vae_tile: int = PARAMETERS_BY_NAME["vae_tile"].default
    window_prompts: str = PARAMETERS_BY_NAME["window_prompts"].default
    regions: str = PARAMETERS_BY_NAME["regions"].default
    strength_map: Any = PARAMETERS_BY_NAME["strength_map"].default  # strength.StrengthMap or None

    def __post_init__(self) -> None:
        for p in PARAMETERS:
            object.__setattr__(self, p.name, p.convert(getattr(self, p.name)))
        if self.max_tile < 2 * self.min_tile:
            raise SettingsError(
                f"max_tile: {self.max_tile} is not allowed; expected at least twice min_tile "
                f"({2 * self.min_tile}), so that splitting a large tile never makes tiles below min_tile"
            )

    @classmethod
    def from_args(cls, args: Any) -> Settings:
        """Settings from a WebUI API `args` value: a positional list, or a list holding one dict of names."""
        if not isinstance(args, (list, tuple)):
            raise SettingsError(f"args: expected a list, got {type(args).__name__}")
        if len(args) == 1 and isinstance(args[0], dict):
            named = args[0]
            unknown = [k for k in named if k not in PARAMETERS_BY_NAME]
            if unknown:
                raise SettingsError(
                    f"{brief_repr(unknown[0])}: unknown argument; known: {', '.join(PARAMETERS_BY_NAME)}"
                )
            return cls(**named)
        if len(args) > len(PARAMETERS):
            raise SettingsError(
                f"args: {len(args)} values given, at most {len(PARAMETERS)} allowed "
                f"({', '.join(PARAMETERS_BY_NAME)})"
            )
        return cls(**{p.name: v for p, v in zip(PARAMETERS, args)})

    def check_upscaler(self, names: list[str] | None) -> Settings:
        """These settings, once their upscaler is known to be one of the host's `names`
        (None: the names are not known here, as outside a WebUI)."""
        if self.upscaler != "None" and names is not None and self.upscaler not in names:
            raise SettingsError(
                f"upscaler: {brief_repr(self.upscaler)} is not allowed; expected one of "
                + ", ".join(repr(name) for name in names)
            )
        return self

    def as_args(self) -> list[Any]:
        """The positional API list for these settings."""
        return [getattr(self, p.name) for p in PARAMETERS]

    def infotext(self) -> dict[str, Any]:
        """Flat scalar infotext entries (never a dict value: the WebUI cuts those at commas).
        Empty text (no regions) and no image are left out: the WebUI would drop an empty value
        anyway. An image is recorded by its digest and size."""
        entries = {}
        for p in PARAMETERS:
            value = getattr(self, p.name)
            if p.image:
                if value is not None:  # the image itself cannot go into a text: its digest does
                    entries[p.infotext_key] = value.infotext
            elif not (p.text and value == ""):
                entries[p.infotext_key] = value
        return entries


assert tuple(f.name for f in fields(Settings)) == tuple(PARAMETERS_BY_NAME), (
    "Settings fields and PARAMETERS disagree"
)
