"""Where the picture may change: a painted strength map and the inpaint mask, per pixel.

A pixel of strength s starts when a standalone img2img at s would start (plan.start_sigma),
and until then returns the clean original, exactly as a tile of that strength does
(DESIGN.md section 7). A pixel's strength is its window's strength times the map, and
zero where the job's inpaint mask keeps the original.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from .quadtree import LATENT_SCALE
from .settings import SettingsError, brief_repr

ASPECT_TOLERANCE = 0.03  # a map within 3% of the init image's aspect ratio is stretched onto it


@dataclass(frozen=True, eq=False)
class StrengthMap:
    """A painted strength map: white is full strength, black keeps the original, grey between.

    Equal maps are equal by their pixels' digest, which the infotext records.
    """

    pixels: np.ndarray  # [height, width] uint8 greyscale
    digest: str

    @classmethod
    def of(cls, pixels: np.ndarray) -> StrengthMap:
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        height, width = pixels.shape
        digest = hashlib.sha256(f"{width}x{height}:".encode() + pixels.tobytes()).hexdigest()[:12]
        return cls(pixels, digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StrengthMap) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        height, width = self.pixels.shape
        return f"StrengthMap({width}x{height} px, {self.digest})"

    @property
    def infotext(self) -> str:
        height, width = self.pixels.shape
        return f"{self.digest} ({width}x{height} px)"


def read_strength_map(value) -> StrengthMap | None:
    """The strength map in a script argument, or None for no map.

    Accepts a PIL image, an array, base64 PNG/JPEG text (with or without a data: prefix),
    gradio's {"image": ..} / {"background": ..} dicts; None, "" and "None" mean no map.
    Colours and transparency: the map is its luminance over black (transparent = keep).
    """
    if value is None or isinstance(value, StrengthMap):
        return value
    if isinstance(value, str) and value.strip() in ("", "None"):
        return None
    if isinstance(value, dict):  # gradio's image editors
        inner = next(
            (value[k] for k in ("composite", "background", "image") if value.get(k) is not None), None
        )
        return read_strength_map(inner)
    image = _image_of(value)
    if image.width == 0 or image.height == 0:
        raise SettingsError(f"strength_map: the image is empty ({image.width}x{image.height} px)")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image)
    elif image.mode in ("I", "I;16", "F"):  # 16-bit and float greyscale: scaled to 8 bits
        array = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" else 65535.0 if array.max() > 255 else 255.0
        return StrengthMap.of(np.clip(np.round(array / top * 255), 0, 255))
    return StrengthMap.of(np.asarray(image.convert("L")))


def _image_of(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        array = value
        if array.dtype != np.uint8:
            array = np.clip(np.round(array.astype(np.float64) * (255 if array.max() <= 1 else 1)), 0, 255)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise SettingsError(f"strength_map: an array of shape {array.shape} is not an image")
        return Image.fromarray(array.astype(np.uint8))
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            data = base64.b64decode(text, validate=True)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return image.copy()
        except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
            raise SettingsError(
                f"strength_map: {brief_repr(value)} is not an image; expected a base64 PNG or JPEG "
                "(a greyscale picture: white = full strength, black = keep the original)"
            ) from None
    raise SettingsError(f"strength_map: {brief_repr(value)} is not an image; expected a base64 PNG or JPEG")


def fit_to_job(
    strength_map: StrengthMap,
    source_size: tuple[int, int],
    job_size: tuple[int, int],
    resize_mode: int = 0,
    crop: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """The map at the job's size in px ([height, width] float32, 0..1), placed as the job
    places its init image.

    The map is painted over the init image (`source_size`, (width, height)): it is
    stretched onto it when their aspect ratios agree within 3%, and refused otherwise.
    Then it goes where the image goes: `crop` (x0, y0, x1, y1) is the WebUI's "Only masked"
    crop, `resize_mode` its resize mode (0 just resize, 1 crop and resize, 2 resize and
    fill, 3 latent upscale: stretched). Resampling is bilinear and area-averaging, so a
    black area stays exactly 0 and no ringing makes a kept pixel start.
    """
    check_fits(strength_map, source_size)
    source_w, source_h = source_size
    values = Image.fromarray(strength_map.pixels.astype(np.float32) / 255, mode="F")
    values = values.resize((source_w, source_h), Image.Resampling.BILINEAR)
    job_w, job_h = job_size
    if crop is not None:
        values = _fill(values.crop(crop), job_w, job_h)  # the WebUI resizes its crop by "resize and fill"
    elif resize_mode == 1:
        values = _crop(values, job_w, job_h)
    elif resize_mode == 2:
        values = _fill(values, job_w, job_h)
    else:
        values = values.resize((job_w, job_h), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(values, dtype=np.float32), 0, 1)


def check_fits(strength_map: StrengthMap, source_size: tuple[int, int]) -> None:
    """Refuse a map whose aspect ratio differs from the init image's by more than 3%."""
    height, width = strength_map.pixels.shape
    source_w, source_h = source_size
    if abs((width / height) / (source_w / source_h) - 1) > ASPECT_TOLERANCE:
        raise SettingsError(
            f"strength_map: {width}x{height} px (aspect {width / height:.3f}) does not fit the init image "
            f"of {source_w}x{source_h} px (aspect {source_w / source_h:.3f}); paint the map over the "
            "init image, or give it the init image's aspect ratio (within 3%)"
        )


def _crop(values: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover width x height, centred, cut to it (the WebUI's "crop and resize")."""
    scale = max(width / values.width, height / values.height)
    w, h = max(1, round(values.width * scale)), max(1, round(values.height * scale))
    values = values.resize((w, h), Image.Resampling.BILINEAR)
    left, top = (w - width) // 2, (h - height) // 2
    return values.crop((left, top, left + width, top + height))


def _fill(values: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to fit inside width x height, centred, the rest filled with the nearest edge
    (the WebUI's "resize and fill" stretches the image's edges into the borders)."""
    scale = min(width / values.width, height / values.height)
    w, h = max(1, round(values.width * scale)), max(1, round(values.height * scale))
    array = np.asarray(values.resize((w, h), Image.Resampling.BILINEAR))
    top, left = (height - h) // 2, (width - w) // 2
    array = np.pad(array, ((top, height - h - top), (left, width - w - left)), mode="edge")
    return Image.fromarray(array, mode="F")


def on_latent_grid(values: np.ndarray | torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Pixel strengths ([h, w] in px) averaged over each latent pixel: [H, W] float32.

    A latent pixel keeps the original (0) only when every one of its pixels does."""
    values = torch.as_tensor(np.asarray(values), dtype=torch.float32)
    height, width = latent_size
    values = values[: height * LATENT_SCALE, : width * LATENT_SCALE]
    if values.shape != (height * LATENT_SCALE, width * LATENT_SCALE):
        values = torch.nn.functional.interpolate(
            values[None, None], size=(height * LATENT_SCALE, width * LATENT_SCALE), mode="bilinear"
        )[0, 0]
    return torch.nn.functional.avg_pool2d(values[None, None], LATENT_SCALE)[0, 0].clamp(0, 1)


def repainted_latent(nmask, latent_size: tuple[int, int]) -> torch.Tensor:
    """The WebUI's latent-grid mask of repainted pixels (`p.nmask`, after blur, rounding and
    "Only masked"; [C, H, W], [1, C, H, W] or [H, W]) as its [H, W] share."""
    mask = torch.as_tensor(nmask).detach().float().cpu()
    while mask.ndim > 2:
        mask = mask[0]
    if tuple(mask.shape) != tuple(latent_size):
        raise ValueError(
            f"inpaint mask: {mask.shape[-1]}x{mask.shape[-2]} latent px, but the job is "
            f"{latent_size[1]}x{latent_size[0]}"
        )
    return mask


def with_inpaint_mask(
    strengths: torch.Tensor | None, nmask, latent_size: tuple[int, int]
) -> torch.Tensor | None:
    """The pixel strengths with the inpaint mask's kept area at 0: a pixel with any share of
    the repaint is active, one the WebUI keeps entirely (nmask 0) returns the original."""
    if nmask is None:
        return strengths
    repainted = (repainted_latent(nmask, latent_size) > 0).float()
    return repainted if strengths is None else strengths * repainted


def pixel_starts(
    strengths: torch.Tensor, job_strength: float, sigmas: torch.Tensor | None, rule: str = "webui"
) -> torch.Tensor:
    """The start sigma of each pixel for its absolute strength (float64, same shape).

    +inf where the pixel is as strong as the job (it starts with the job), -inf at 0 (never
    starts: the original is kept); between, the plan's rule (Plan.start_rule): "webui", the
    WebUI img2img rule on the full schedule (plan.start_sigma); "run", the last
    int(N * s / job_strength) steps of the N the sampler runs (ComfyUI).
    """
    s = strengths.double()
    top = min(job_strength, 1.0)
    starts = torch.where(s >= top, math.inf, -math.inf).to(torch.float64)
    between = (s > 0) & (s < top)
    if between.any():
        if sigmas is None:
            raise ValueError(
                "strength map: grey pixels need the sampler's sigmas; pass sigmas= to build_plan"
            )
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        steps = len(sigmas) - 1
        if rule == "run":
            runs = (s[between] / top * steps + 1e-6).floor().long()
            starts[between] = torch.where(runs > 0, sigmas[steps - runs], -math.inf)
        else:
            t_enc = (s[between].clamp(max=0.999) * steps).floor().long()
            starts[between] = sigmas[steps - t_enc - 1]
    return starts


def repainted_share(mask: Image.Image, size: tuple[int, int], blur: int = 0, invert=False) -> np.ndarray:
    """An inpaint mask as the WebUI prepares it, for the preview ([height, width] in 0..1 at
    `size` = (width, height)): painted (white or opaque) pixels above half become the
    repainted area, "Inpaint not masked" inverts it, and `Mask blur` softens its edge (a
    Gaussian of that standard deviation in px). The job itself reads the WebUI's own mask."""
    if mask.mode in ("RGBA", "LA") and mask.getextrema()[-1] != (255, 255):
        grey = mask.getchannel("A")  # a painted layer: its opacity is the mask
    else:
        grey = mask.convert("L")
    binary = grey.point(lambda v: 255 if v > 128 else 0)
    if invert:
        binary = ImageOps.invert(binary)
    if blur > 0:
        binary = binary.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(binary.resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255
