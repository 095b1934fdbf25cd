"""Overlay picture of a plan: tiles coloured by denoise strength, skipped tiles hatched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .plan import Plan
from .prompts import parse_regions
from .quadtree import LATENT_SCALE, detail_density, to_rgb_array
from .settings import brief_repr

DEFAULT_IMAGE = Path(__file__).parent / "data" / "astronaut.jpg"

# Strength 0, 1/3, 2/3, 1: blue, teal, gold, red. Four stops, so that no strength between
# them mixes to grey and the common 0.3..0.7 range spans three distinct hues.
RAMP = ((40, 80, 255), (0, 190, 170), (250, 190, 0), (240, 40, 30))
NEUTRAL = (255, 255, 255, 40)  # veil over active tiles when variable denoise is off
REGION_COLOUR = (255, 60, 220)  # outline and label of a prompt region


def karras_sigmas(steps: int, sigma_min: float = 0.0292, sigma_max: float = 14.6146, rho: float = 7.0):
    """A nominal schedule for previews: Karras et al.'s, `steps` sigmas plus a final 0 (SD1.5's range)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def load_image(path: str | Path | None = None) -> Image.Image:
    """An image file as RGB (upright by its EXIF orientation); the bundled photo when None."""
    with Image.open(DEFAULT_IMAGE if path is None else path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def strength_colour(strength: float) -> tuple[int, int, int]:
    """The ramp's colour for a denoise strength in 0..1."""
    s = min(max(strength, 0.0), 1.0) * (len(RAMP) - 1)
    i = min(int(s), len(RAMP) - 2)
    return tuple(round(a + (b - a) * (s - i)) for a, b in zip(RAMP[i], RAMP[i + 1]))


DETAIL_COLOUR = (255, 225, 40)  # detailed pixels in the detail map


def detail_picture(picture: Image.Image) -> Image.Image:
    """The detail map of a picture: its detailed pixels bright yellow over the dimmed photo."""
    dim = Image.eval(picture.convert("L"), lambda v: v * 3 // 10).convert("RGB")
    density = Image.fromarray(np.uint8(np.round(detail_density(picture) * 255)))
    return Image.composite(Image.new("RGB", picture.size, DETAIL_COLOUR), dim, density)


def draw_plan(image, plan: Plan, show_detail: bool = False) -> Image.Image:
    """The image at the plan's pixel size with every tile drawn on it, and the summary below.

    With variable denoise each active tile is a tone of its strength's colour; skipped tiles
    keep the photo's own colours under diagonal hatching. show_detail: draw the tiles over
    the detail map that decided them instead of over the photo.
    """
    height, width = (side * LATENT_SCALE for side in plan.latent_size)
    picture = Image.fromarray(to_rgb_array(image)).resize((width, height), Image.Resampling.LANCZOS)
    if show_detail:
        picture = detail_picture(picture)
    grey = picture.convert("L")
    overlay = Image.new("RGBA", (width, height))
    draw = ImageDraw.Draw(overlay)
    font = _font(max(12, min(width, height) // 64))
    variable = plan.settings.variable_denoise
    placed = sorted({phrase for leaf in plan.leaves for phrase in leaf.prompt.left_out})
    line = font.getbbox("Ag")[3] + 4  # the height of a label (Pillow 9.5's bitmap font has no size)
    for leaf in plan.leaves:
        box = tuple(v * LATENT_SCALE for v in (leaf.x, leaf.y, leaf.x + leaf.w, leaf.y + leaf.h))
        if leaf.skipped:
            overlay.alpha_composite(_hatch(box[2] - box[0], box[3] - box[1]), box[:2])
        elif variable:
            c = strength_colour(leaf.strength)
            dark, light = tuple(v // 4 for v in c), tuple(v + (255 - v) * 3 // 4 for v in c)
            picture.paste(ImageOps.colorize(grey.crop(box), dark, light, mid=c), box[:2])
        else:
            draw.rectangle(box, fill=NEUTRAL)
        edge = [box[0], box[1], box[2] - 1, box[3] - 1]
        draw.rectangle(edge, outline=(20, 20, 20, 230), width=2)
        draw.rectangle([v + d for v, d in zip(edge, (2, 2, -2, -2))], outline=(255, 255, 255, 150))
        label = "skip" if leaf.skipped else f"{leaf.strength:.2f}" if variable else ""
        if label:
            corner = (box[0] + 6, box[1] + 5)
            draw.text(corner, label, font=font, fill="white", stroke_width=2, stroke_fill="black")
        told = [brief_repr(p) for p in placed if p not in leaf.prompt.left_out]
        if told and not leaf.skipped:  # the placed phrases this tile is told
            draw.text((box[0] + 6, box[3] - line - 4), "+" + ", +".join(told), font=font, fill="white",
                      stroke_width=2, stroke_fill="black")  # fmt: skip
    if plan.pixel_strength is not None:  # pixels the strength map or the inpaint mask keeps
        kept = plan.pixel_strength <= 0
        if kept.any():
            mask = Image.fromarray(np.uint8(kept.numpy()) * 255).resize(
                (width, height), Image.Resampling.NEAREST
            )
            hatch = Image.new("RGBA", (width, height))
            hatch.paste(_hatch(width, height), mask=mask)
            overlay.alpha_composite(hatch)
    regions = parse_regions(plan.settings.regions)
    for region in regions:
        box = (region.x0 * width, region.y0 * height, region.x1 * width - 1, region.y1 * height - 1)
        draw.rectangle(box, outline=REGION_COLOUR + (255,), width=3)
        draw.text((box[0] + 8, box[1] + line + 8), brief_repr(region.prompt), font=font,
                  fill=REGION_COLOUR, stroke_width=2, stroke_fill="black")  # fmt: skip
    picture = Image.alpha_composite(picture.convert("RGBA"), overlay).convert("RGB")
    key = "Yellow: fine detail, which decides where tiles split. " if show_detail else ""
    key += "Tile colour and number: denoise strength (blue 0, teal, gold, red 1). " if variable else ""
    key += "Hatched: skipped, the original is kept. " if plan.keeps_original else ""
    key += "Magenta: regions; a tile gets the prompt of each region holding its centre. " if regions else ""
    if placed:
        key += (
            "Words where they are: +phrase marks the tiles told a phrase the model places in one part "
            "of the picture; the other phrases go to every tile."
        )
    return _with_legend(picture, [plan.summary(), key, *plan.notes], font)


def _hatch(width: int, height: int, spacing: int = 12) -> Image.Image:
    """Diagonal white-on-dark lines filling a width x height tile."""
    tile = Image.new("RGBA", (width, height))
    draw = ImageDraw.Draw(tile)
    for k in range(0, width + height, spacing):
        draw.line([(k, 0), (k - height, height)], fill=(0, 0, 0, 150), width=3)
        draw.line([(k, 0), (k - height, height)], fill=(255, 255, 255, 200), width=1)
    return tile


def _with_legend(picture: Image.Image, lines: list[str], font) -> Image.Image:
    """The picture with a dark strip below holding the text, wrapped to the picture's width."""
    measure = ImageDraw.Draw(picture)
    wrapped: list[str] = []
    for text in filter(None, lines):
        line = ""
        for word in text.split():
            if line and measure.textlength(f"{line} {word}", font=font) > picture.width - 16:
                wrapped.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        wrapped.append(line)
    line_height = font.getbbox("Ag")[3] + 5
    out = Image.new("RGB", (picture.width, picture.height + line_height * len(wrapped) + 12), (24, 24, 28))
    out.paste(picture)
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(wrapped):
        draw.text((8, picture.height + 6 + i * line_height), line, font=font, fill=(235, 235, 235))
    return out


def _font(size: int):
    """PIL's default font at this size (Pillow >= 10.1), else its small bitmap font."""
    try:
        return ImageFont.load_default(size)
    except (TypeError, OSError, ImportError):  # older Pillow (the WebUI pins 9.5) or no FreeType
        return ImageFont.load_default()
