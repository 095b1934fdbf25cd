"""Quadtree leaves -> model windows, per-tile strengths and start sigmas."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from .quadtree import LATENT_SCALE, build_quadtree, detail_map
from .settings import Settings

ALWAYS = math.inf  # start sigma of a tile that is active from the first step
NO_SCHEDULE_NOTE = "variable denoise: no sampler schedule given, tile start sigmas are unknown"


@dataclass(frozen=True)
class Leaf:
    """One quadtree tile, in latent pixels."""

    x: int
    y: int
    w: int
    h: int
    strength: float  # denoising strength; 1.0 = the job's own strength (variable denoise off)
    skipped: bool
    start_sigma: float | None  # the tile is denoised while sigma <= this; None = schedule unknown
    detail: float  # colour deviation that decided the split

    def is_active(self, sigma: float) -> bool:
        if self.skipped or self.start_sigma is None:
            return not self.skipped
        return sigma <= self.start_sigma * (1 + 1e-3)  # same schedule; fp16 hosts round it


@dataclass(frozen=True)
class Window:
    """The model's view of one leaf: the leaf grown by the overlap, kept inside the latent."""

    x: int
    y: int
    w: int
    h: int
    leaf: int  # index into Plan.leaves


@dataclass
class Plan:
    leaves: list[Leaf]
    windows: list[Window]
    latent_size: tuple[int, int]
    settings: Settings
    notes: list[str] = field(default_factory=list)

    def with_sigmas(self, sigmas: torch.Tensor) -> Plan:
        """The same tiles with start sigmas from the sampler's full schedule."""
        sigmas = _checked_sigmas(sigmas)
        leaves = [
            dataclasses.replace(leaf, start_sigma=start_sigma(leaf.strength, sigmas)) for leaf in self.leaves
        ]
        notes = [n for n in self.notes if n != NO_SCHEDULE_NOTE]
        return dataclasses.replace(self, leaves=leaves, notes=notes)

    @property
    def max_strength(self) -> float:
        """The strength the whole job must run at (the largest strength of any tile)."""
        return max((leaf.strength for leaf in self.leaves), default=0.0)

    @property
    def uses_original(self) -> bool:
        """Whether some tile needs the original latent (skipped or started late)."""
        return any(leaf.skipped or leaf.strength < 1.0 for leaf in self.leaves)

    def summary(self) -> str:
        sizes = Counter((leaf.w * LATENT_SCALE, leaf.h * LATENT_SCALE) for leaf in self.leaves)
        by_size = ", ".join(f"{n}x {w}x{h}" for (w, h), n in sorted(sizes.items(), reverse=True))
        height, width = self.latent_size
        skipped = sum(leaf.w * leaf.h for leaf in self.leaves if leaf.skipped) / (width * height)
        grid = grid_work(self.latent_size, self.settings)
        return (
            f"{len(self.leaves)} tiles ({by_size}); skipped {skipped:.0%} of the area; "
            f"estimated model work {estimated_work(self) / grid:.0%} of a uniform "
            f"{self.settings.max_tile} px grid"
        )

    def to_json(self) -> dict:
        height, width = self.latent_size

        def leaf_json(leaf: Leaf) -> dict:
            start = leaf.start_sigma
            return {
                "x": leaf.x,
                "y": leaf.y,
                "w": leaf.w,
                "h": leaf.h,
                "strength": leaf.strength,
                "skipped": leaf.skipped,
                # JSON has no infinity: a tile that starts with the job says so instead.
                "starts_with_job": start is not None and math.isinf(start),
                "start_sigma": None if start is None or math.isinf(start) else start,
                "detail": round(leaf.detail, 3),
            }

        return {
            "latent_size": {"width": width, "height": height},
            "pixel_size": {"width": width * LATENT_SCALE, "height": height * LATENT_SCALE},
            "settings": {name: getattr(self.settings, name) for name in self.settings.__dataclass_fields__},
            "leaves": [leaf_json(leaf) for leaf in self.leaves],
            "windows": [{"x": w.x, "y": w.y, "w": w.w, "h": w.h, "leaf": w.leaf} for w in self.windows],
            "summary": self.summary(),
            "notes": list(self.notes),
        }


def start_sigma(strength: float, sigmas: torch.Tensor | None) -> float | None:
    """Noise level at which a tile of this strength starts, by the WebUI img2img rule.

    Strength 1.0 is the job's own strength (variable denoise off): active from the start.
    """
    if strength >= 1.0:
        return ALWAYS
    if strength <= 0:
        return 0.0
    if sigmas is None:
        return None
    steps = len(sigmas) - 1
    t_enc = int(min(strength, 0.999) * steps)
    return float(sigmas[steps - t_enc - 1])


def tile_strengths(leaves, settings: Settings) -> list[float]:
    """Per-leaf strength interpolated by depth (log2 of the tile size) between the two ends."""
    if not settings.variable_denoise or not leaves:
        return [1.0] * len(leaves)
    depth = [math.log2(leaf.w * leaf.h) / 2 for leaf in leaves]
    largest, smallest = max(depth), min(depth)
    span = largest - smallest
    return [
        settings.denoise_largest
        if span == 0
        else settings.denoise_largest
        + (largest - d) / span * (settings.denoise_smallest - settings.denoise_largest)
        for d in depth
    ]


def build_plan(
    image,
    settings: Settings,
    latent_size: tuple[int, int],
    sigmas: torch.Tensor | None = None,
    align: int = 1,
) -> Plan:
    """The tiling plan of one job.

    image: PIL image or HxWx3 array of any size; it is mapped onto the latent grid.
    latent_size: (height, width) in latent pixels.
    sigmas: the full k-diffusion schedule (N+1 values ending in 0); variable denoise needs it
        to give each tile its start sigma.
    align: leaf coordinates are multiples of this many latent pixels (2 for 2x2-patch models).
    """
    height, width = (int(v) for v in latent_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"latent_size: {width}x{height} latent px is empty")
    if sigmas is not None:
        sigmas = _checked_sigmas(sigmas)
    scale = LATENT_SCALE
    detail = detail_map(image, (height, width))
    nodes = build_quadtree(
        detail, settings.detail_threshold, settings.min_tile // scale, settings.max_tile // scale, align
    )
    regions = [region for region, _ in nodes]
    skipped = [min(r.w, r.h) * scale < settings.skip_below for r in regions]
    active = [r for r, s in zip(regions, skipped) if not s]
    strengths = dict(zip(active, tile_strengths(active, settings)))
    leaves = []
    for (region, deviation), skip in zip(nodes, skipped):
        strength = 0.0 if skip else strengths[region]
        # Strength 0 (variable denoise down to 0) is a skip too: the tile never starts.
        start = start_sigma(strength, sigmas)
        leaves.append(Leaf(region.x, region.y, region.w, region.h, strength, strength == 0, start, deviation))
    notes = []
    if settings.variable_denoise and sigmas is None:
        notes.append(NO_SCHEDULE_NOTE)
    ov = settings.overlap // scale
    windows = [_window(leaf, i, ov, width, height) for i, leaf in enumerate(leaves)]
    return Plan(leaves, windows, (height, width), settings, notes)


def _checked_sigmas(sigmas) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    if len(sigmas) < 2 or not torch.isfinite(sigmas).all():
        raise ValueError("sigmas: expected a finite schedule of N+1 values ending in 0")
    return sigmas


def _window(leaf: Leaf, index: int, overlap: int, width: int, height: int) -> Window:
    """The leaf grown by the overlap, at most a quarter of its shorter side: a small tile
    in a wide band would cost several times its own area in model work."""
    overlap = min(overlap, min(leaf.w, leaf.h) // 4)
    w = min(leaf.w + 2 * overlap, width)
    h = min(leaf.h + 2 * overlap, height)
    x = min(max(leaf.x - overlap, 0), width - w)
    y = min(max(leaf.y - overlap, 0), height - h)
    return Window(x, y, w, h, index)


def estimated_work(plan: Plan, steps: int = 20) -> float:
    """Model work in latent pixels x share of the job's denoiser calls, from the strengths.

    A tile of strength d runs int(d * steps) + 1 of the job's int(top * steps) + 1 calls
    (the WebUI img2img rule), for a nominal step count.
    """

    def calls(strength: float) -> int:
        return int(min(strength, 0.999) * steps) + 1

    top = calls(plan.max_strength)
    return sum(
        plan.windows[i].w * plan.windows[i].h * calls(leaf.strength) / top
        for i, leaf in enumerate(plan.leaves)
        if not leaf.skipped
    )


def grid_work(latent_size: tuple[int, int], settings: Settings) -> float:
    """Model work of a uniform grid of max_tile windows with the same overlap, every step."""
    return sum(
        w * h
        for _, _, w, h in uniform_grid(
            latent_size, settings.max_tile // LATENT_SCALE, settings.overlap // LATENT_SCALE
        )
    )


def uniform_grid(latent_size: tuple[int, int], tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """The fixed grid of the common tiled-diffusion extensions: tile-sized windows that
    overlap by `overlap`, the last row and column shifted inward to stay in the image."""
    height, width = latent_size

    def starts(size: int) -> list[int]:
        t = min(tile, size)
        n = max(1, math.ceil((size - overlap) / max(t - overlap, 1)))
        return sorted({min(i * (t - overlap), size - t) for i in range(n)})

    tw, th = min(tile, width), min(tile, height)
    return [(x, y, tw, th) for y in starts(height) for x in starts(width)]
