"""Quadtree leaves -> model windows, per-tile strengths and start sigmas."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import astuple, dataclass, field

import torch

from .prompts import WindowPrompt, parse_regions, phrases_left_out
from .quadtree import LATENT_SCALE, Node, Region, build_quadtree, detail_grid
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
    detail: float  # share of detailed pixels (0..1) that decided the split
    prompt: WindowPrompt = WindowPrompt()  # what the tile is told beyond or short of the job's prompt
    # False: the tile changes nothing (pixel strengths 0 over it, and no repainted pixel of an
    # inpaint mask within its band): its window is never evaluated and leaves the blend.
    changes: bool = True

    @property
    def state(self) -> tuple:
        """What tiles sharing a window must agree on (a window over kept pixels only is never
        evaluated, so it must not be one with a window that is)."""
        return self.strength, self.skipped, self.prompt, self.changes

    def is_active(self, sigma: float) -> bool:
        if self.skipped or self.start_sigma is None:
            return not self.skipped
        return sigma <= self.start_sigma * (1 + 1e-3)  # same schedule; fp16 hosts round it


@dataclass(frozen=True)
class Window:
    """What the model sees for leaves of one strength and skip state, and where its result goes.

    The model denoises the view (x, y, w, h); only the bands (each a group of the leaves
    grown by the overlap) take part in the blend, so a view grown for context never
    overrides the windows that own the pixels around it.
    """

    x: int
    y: int
    w: int
    h: int
    bands: tuple[Region, ...]  # blended parts, in latent pixels of the whole image; inside the view
    leaves: tuple[int, ...]  # indices into Plan.leaves, all of one strength, skip state and prompt


@dataclass
class Plan:
    leaves: list[Leaf]
    windows: list[Window]
    latent_size: tuple[int, int]
    settings: Settings
    notes: list[str] = field(default_factory=list)
    # Where the picture may change (strength.py): [H, W] in 0..1, a strength map times the
    # inpaint mask; a pixel's strength is its window's times this. None: 1 everywhere.
    pixel_strength: torch.Tensor | None = None
    job_strength: float = 1.0  # the strength the job runs at (a tile of strength 1.0 has it)
    sigmas: torch.Tensor | None = None  # the sampler's full schedule, once known
    # How a strength picks its start in `sigmas`: "webui", the WebUI img2img rule on the full
    # schedule (start_sigma); "run", ComfyUI's: the last int(N * s / job_strength) of the
    # N steps of the schedule the sampler runs (hosts/comfyui.py run_starts).
    start_rule: str = "webui"

    def with_sigmas(self, sigmas: torch.Tensor) -> Plan:
        """The same tiles with start sigmas from the sampler's full schedule."""
        sigmas = _checked_sigmas(sigmas)
        leaves = [
            dataclasses.replace(leaf, start_sigma=start_sigma(leaf.strength, sigmas)) for leaf in self.leaves
        ]
        notes = [n for n in self.notes if n != NO_SCHEDULE_NOTE]
        return dataclasses.replace(self, leaves=leaves, notes=notes, sigmas=sigmas)

    def window_strength(self, window: Window) -> float:
        """The absolute strength of a window's tiles (1.0 stands for the job's own)."""
        return min(self.leaves[window.leaves[0]].strength, self.job_strength)

    def window_reaches(self, window: Window) -> float:
        """The largest pixel strength in a window's bands, relative to its tiles' (1 without a
        map; 0 for a window that changes nothing)."""
        if not self.leaves[window.leaves[0]].changes:
            return 0.0
        if self.pixel_strength is None:
            return 1.0
        return max(float(self.pixel_strength[b.y : b.y + b.h, b.x : b.x + b.w].max()) for b in window.bands)

    @property
    def max_strength(self) -> float:
        """The strength the whole job must run at (the largest strength of any tile)."""
        return max((leaf.strength for leaf in self.leaves), default=0.0)

    @property
    def keeps_original(self) -> bool:
        """Whether the job keeps the original somewhere (skipped tiles, pixels of strength 0)."""
        kept_pixels = self.pixel_strength is not None and bool((self.pixel_strength <= 0).any())
        return kept_pixels or any(leaf.skipped for leaf in self.leaves)

    @property
    def uses_original(self) -> bool:
        """Whether some tile needs the original latent (skipped or started late)."""
        return self.pixel_strength is not None or any(
            leaf.skipped or leaf.strength < 1.0 for leaf in self.leaves
        )

    def summary(self) -> str:
        sizes = Counter((leaf.w * LATENT_SCALE, leaf.h * LATENT_SCALE) for leaf in self.leaves)
        by_size = ", ".join(f"{n}x {w}x{h}" for (w, h), n in sorted(sizes.items(), reverse=True))
        height, width = self.latent_size
        kept = torch.zeros(self.latent_size, dtype=torch.bool)
        for leaf in self.leaves:
            kept[leaf.y : leaf.y + leaf.h, leaf.x : leaf.x + leaf.w] = leaf.skipped
        if self.pixel_strength is not None:
            kept |= self.pixel_strength <= 0
        skipped = float(kept.float().mean())
        grid = grid_work(self.latent_size, self.settings)
        windows = f"{len(self.windows)} model window" + "s" * (len(self.windows) != 1)
        return (
            f"{len(self.leaves)} tiles ({by_size}) in {windows}; "
            f"skipped {skipped:.0%} of the area; estimated model work {estimated_work(self) / grid:.0%} "
            f"of a uniform {self.settings.max_tile} px grid with the same blend band"
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
                "prompt": {"added": list(leaf.prompt.added), "left_out": list(leaf.prompt.left_out)},
            }

        return {
            "latent_size": {"width": width, "height": height},
            "pixel_size": {"width": width * LATENT_SCALE, "height": height * LATENT_SCALE},
            "settings": {name: getattr(self.settings, name) for name in self.settings.__dataclass_fields__},
            "leaves": [leaf_json(leaf) for leaf in self.leaves],
            "windows": [
                {**_box(w), "bands": [_box(b) for b in w.bands], "leaves": list(w.leaves)}
                for w in self.windows
            ],
            "summary": self.summary(),
            "notes": list(self.notes),
        }


def _box(r) -> dict:
    return {"x": r.x, "y": r.y, "w": r.w, "h": r.h}


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
    placed: dict[str, torch.Tensor] | None = None,
    pixel_strength: torch.Tensor | None = None,
    job_strength: float = 1.0,
    inpaint_mask: torch.Tensor | None = None,
) -> Plan:
    """The tiling plan of one job.

    image: PIL image or HxWx3 array of any size; its detail is measured at its own
        resolution and mapped onto the latent grid.
    latent_size: (height, width) in latent pixels.
    sigmas: the full k-diffusion schedule (N+1 values ending in 0); variable denoise needs it
        to give each tile its start sigma.
    align: every coordinate of the leaves, bands and views is a multiple of this many latent
        pixels, or the image's own border (2 for models with 2x2 patches: Flux, SD3).
    placed: "Words where they are": phrase -> where its attention lies ([H, W] bool on the
        latent grid, `prompts.placed_masks`); a tile is not told the phrases placed elsewhere.
    pixel_strength: where the picture may change ([H, W] in 0..1, strength.py: a strength map
        times the inpaint mask); a pixel's strength is its tile's times this. Tiles none of
        whose own pixels is above 0 change nothing (see inpaint_mask): they get windows of
        their own, which are never evaluated.
    job_strength: the strength the job runs at (with pixel strengths: a tile of strength 1.0
        has it, and a pixel at 1 starts with the job).
    inpaint_mask: the repainted share of each latent pixel ([H, W], the WebUI's nmask), whose
        zeros pixel_strength holds too. A tile whose own pixels all keep the original changes
        nothing: its window leaves the blend (the tiles that change blend the pixels its band
        would reach), unless its band reaches a repainted pixel of the mask: the WebUI blends
        the mask's edge itself, and the image must stay what it is with every window computed.
    """
    height, width = (int(v) for v in latent_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"latent_size: {width}x{height} latent px is empty")
    if sigmas is not None:
        sigmas = _checked_sigmas(sigmas)
    if pixel_strength is not None:
        pixel_strength = torch.as_tensor(pixel_strength, dtype=torch.float32).cpu()
        if tuple(pixel_strength.shape) != (height, width):
            raise ValueError(
                f"pixel_strength: {tuple(pixel_strength.shape)} latent px, but the job is {(height, width)}"
            )
    scale = LATENT_SCALE
    root = build_quadtree(
        detail_grid(image, (height, width)),
        settings.detail_threshold,
        settings.min_tile // scale,
        settings.max_tile // scale,
        align,
    )
    nodes = list(root.leaves())
    skipped = [min(n.region.w, n.region.h) * scale < settings.skip_below for n in nodes]
    active = [n.region for n, s in zip(nodes, skipped) if not s]
    strengths = dict(zip(active, tile_strengths(active, settings)))
    regions = parse_regions(settings.regions)
    leaves = []
    for node, skip in zip(nodes, skipped):
        r = node.region
        strength = 0.0 if skip else strengths[r]
        # Strength 0 (variable denoise down to 0) is a skip too: the tile never starts.
        start = start_sigma(strength, sigmas)
        prompt = WindowPrompt()
        if strength > 0:  # a skipped tile is never told anything
            centre = ((r.x + r.w / 2) / width, (r.y + r.h / 2) / height)
            prompt = WindowPrompt(
                added=tuple(region.prompt for region in regions if region.covers(*centre)),
                left_out=phrases_left_out(placed, *astuple(r)) if placed else (),
            )
        changes = pixel_strength is None or _holds_active(pixel_strength, r, 0)
        if inpaint_mask is not None and not changes:  # a band over repainted pixels blends them
            changes = _holds_active(inpaint_mask, r, settings.overlap // scale)
        leaves.append(Leaf(r.x, r.y, r.w, r.h, strength, strength == 0, start, node.detail, prompt, changes))
    notes = []
    if settings.variable_denoise and sigmas is None:
        notes.append(NO_SCHEDULE_NOTE)
    index = {node.region: i for i, node in enumerate(nodes)}
    groups = _groups(root, index, leaves, settings.max_tile // scale)
    windows = _windows(
        groups,
        leaves,
        settings.overlap // scale,
        settings.min_window // scale,
        settings.max_tile // scale,
        width,
        height,
        align,
    )
    return Plan(
        leaves, windows, (height, width), settings, notes, pixel_strength, float(job_strength), sigmas
    )


def _holds_active(values: torch.Tensor, r: Region, overlap: int) -> bool:
    """Whether a tile grown by `overlap` (its band reaches no farther) holds a value above 0."""
    y0, x0 = max(r.y - overlap, 0), max(r.x - overlap, 0)
    return bool((values[y0 : r.y + r.h + overlap, x0 : r.x + r.w + overlap] > 0).any())


def _groups(node: Node, index: dict, leaves: list[Leaf], max_side: int) -> list[tuple[Region, tuple]]:
    """Maximal subtrees (at most max_side) whose leaves share strength, skip state and prompt.

    Each becomes one window: neighbouring tiles that would be denoised alike need no
    seams between them, and sharing a window gives small tiles context at no extra cost.
    """
    members = tuple(index[leaf.region] for leaf in node.leaves())
    states = {leaves[i].state for i in members}
    r = node.region
    if len(states) == 1 and max(r.w, r.h) <= max_side or not node.children:
        return [(r, members)]
    return [group for child in node.children for group in _groups(child, index, leaves, max_side)]


def _checked_sigmas(sigmas) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    if len(sigmas) < 2 or not torch.isfinite(sigmas).all():
        raise ValueError("sigmas: expected a finite schedule of N+1 values ending in 0")
    return sigmas


def _windows(
    groups: list[tuple[Region, tuple]],
    leaves: list[Leaf],
    overlap: int,
    min_view: int,
    max_side: int,
    width: int,
    height: int,
    align: int = 1,
) -> list[Window]:
    """The windows of the groups: groups of one state packed together where that costs no more.

    Band: a group's region grown by the overlap (at most a quarter of its shorter side, so
    a small tile's blend band stays in proportion), cut at the image border. View: the
    bands' bounding box grown about its centre to at least min_view per side, as far as
    the image allows, so the model sees enough of the picture around small tiles. Groups
    of one strength and skip state share a window when its view is no larger than their
    separate views together (and no larger than a max_tile window): small tiles scattered
    between skipped ones would otherwise each pay for a whole view of their own.
    Bands and views start and end on multiples of `align` (or at the image border), as
    the leaves do, so a patch model's patches never straddle a window's edge.
    """
    largest = max_side + 2 * overlap  # a view never larger than a window of max_tile would be
    packed: list[tuple[tuple, list[Region], list[int]]] = []
    for region, members in groups:
        reach = min(overlap, min(region.w, region.h) // 4) // align * align
        x0, y0 = max(region.x - reach, 0), max(region.y - reach, 0)
        x1, y1 = min(region.x + region.w + reach, width), min(region.y + region.h + reach, height)
        band = Region(x0, y0, x1 - x0, y1 - y0)
        state = leaves[members[0]].state
        alone = _view([band], min_view, width, height, align)
        for same, bands, indices in packed:
            if same != state:
                continue
            apart = _view(bands, min_view, width, height, align)
            joined = _view(bands + [band], min_view, width, height, align)
            if (
                max(joined.w, joined.h) <= largest
                and joined.w * joined.h <= apart.w * apart.h + alone.w * alone.h
            ):
                bands.append(band)
                indices.extend(members)
                break
        else:
            packed.append((state, [band], list(members)))
    return [
        Window(*astuple(_view(bands, min_view, width, height, align)), tuple(bands), tuple(indices))
        for _, bands, indices in packed
    ]


def _view(bands: list[Region], min_view: int, width: int, height: int, align: int = 1) -> Region:
    """The bands' bounding box grown about its centre to at least min_view, inside the image."""
    box = _bounds(bands)
    x, w = _grown(box.x, box.w, min_view, width, align)
    y, h = _grown(box.y, box.h, min_view, height, align)
    return Region(x, y, w, h)


def _bounds(regions: list[Region]) -> Region:
    x0, y0 = min(r.x for r in regions), min(r.y for r in regions)
    x1, y1 = max(r.x + r.w for r in regions), max(r.y + r.h for r in regions)
    return Region(x0, y0, x1 - x0, y1 - y0)


def _grown(start: int, size: int, least: int, limit: int, align: int = 1) -> tuple[int, int]:
    """[start, start + size) grown about its centre to at least `least`, kept in [0, limit).

    With `start` and `start + size` on multiples of `align` (or at `limit`), so are the
    ends of the result.
    """
    if size >= least or size >= limit:
        return start, size
    grown = min(-(-max(size, min(least, limit)) // align) * align, limit)
    begin = min(max(start - (grown - size) // 2 // align * align, 0), limit - grown)
    end = begin + grown
    begin = begin // align * align  # moved off the grid only by an unaligned image border
    return begin, end - begin


def estimated_work(plan: Plan, steps: int = 20) -> float:
    """Model work in latent pixels x share of the job's denoiser calls, from the strengths.

    A window of strength d runs int(d * steps) + 1 of the job's int(top * steps) + 1 calls
    (the WebUI img2img rule), for a nominal step count; with pixel strengths, d is its
    tiles' strength times the largest pixel strength in its bands. Windows with the same view and
    prompt are evaluated once per call (the denoiser shares the view), so such a view
    counts once, for as many calls as its longest-running window.
    """

    def calls(strength: float) -> int:
        return int(min(strength, 0.999) * steps) + 1

    top = calls(plan.max_strength)
    views: dict[tuple, int] = {}
    for w in plan.windows:
        leaf = plan.leaves[w.leaves[0]]
        reach = plan.window_reaches(w)  # a window whose bands are all kept is never evaluated
        if not leaf.skipped and reach > 0:
            key = (w.x, w.y, w.w, w.h, leaf.prompt)
            views[key] = max(views.get(key, 0), calls(leaf.strength * reach))
    return sum(w * h * n / top for (_, _, w, h, _), n in views.items())


def grid_work(latent_size: tuple[int, int], settings: Settings) -> float:
    """Model work of a uniform grid of max_tile windows with the same blend band, every step.

    Neighbouring windows of a plan share a band twice the overlap wide (each reaches
    `overlap` into the other); a grid gets the same band by overlapping that much.
    """
    tile, band = settings.max_tile // LATENT_SCALE, 2 * settings.overlap // LATENT_SCALE
    return sum(w * h for _, _, w, h in uniform_grid(latent_size, tile, band))


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
