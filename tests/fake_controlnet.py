"""Stand-ins for the two hosts' ControlNets, with their call patterns and caches.

Written from reading sd-webui-controlnet 1.1.455 (`scripts/hook.py`: `ControlParams` and
the UNet forward it installs) and Forge 2 (`backend/patcher/controlnet.py` and
`backend/sampling/sampling_function.py`); none of their code is copied.

The control models are pointwise on the latent grid: a latent pixel's control is a fixed
function of the 8 x 8 hint pixels above it. Tiling then changes nothing when each window
gets its own crop, and any crop in the wrong place or rows shows in the result. Hints
carry their own pixel coordinates (channels 0 and 1), so each call's crops can be read
back from what the control model saw.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F


def coordinate_hint(width: int, height: int, seed: int = 0, images: int = 1) -> torch.Tensor:
    """[images, 3, H, W]: x px, y px, and a random picture (its values differ per image)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    picture = torch.rand(images, 1, height // 8, width // 8, generator=g).repeat_interleave(8, -1)
    picture = picture.repeat_interleave(8, -2)
    coords = torch.stack([xs, ys]).float().expand(images, 2, height, width)
    return torch.cat([coords, picture], dim=1)


def latent_mask(width: int, height: int, seed: int = 1) -> torch.Tensor:
    """[1, 1, H, W] region mask in px, constant over each latent pixel (exact under bilinear pooling)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(1, 1, height // 8, width // 8, generator=g)
    return mask.repeat_interleave(8, -1).repeat_interleave(8, -2)


class PointwiseControl(torch.nn.Module):
    """hint [N, 3, h8, w8] -> control [N, 1, h, w]; records where each call's hint rows lie."""

    def __init__(self, gain: float = 0.8):
        super().__init__()
        self.gain = gain
        self.boxes: list[list[tuple[int, int, int, int]]] = []  # per call: (x, y, w, h) in latent px

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        self.boxes.append(
            [
                (int(row[0, 0, 0]) // 8, int(row[1, 0, 0]) // 8, row.shape[-1] // 8, row.shape[-2] // 8)
                for row in hint
            ]
        )
        picture = F.avg_pool2d(hint[:, 2:3], 8)
        where = F.avg_pool2d(hint[:, :2].sum(1, keepdim=True), 8)
        return self.gain * (picture - 0.5) + 1e-4 * where


class CachingAdapter(PointwiseControl):
    """A T2I-Adapter: its first result is kept until `reset()` (sd-webui-controlnet's PlugableAdapter)."""

    def __init__(self, gain: float = 0.8):
        super().__init__(gain)
        self.control = None

    def reset(self):
        self.control = None

    def forward(self, hint):
        if self.control is None:
            self.control = super().forward(hint)
        return self.control.clone()


# ---------------------------------------------------------------- A1111 (sd-webui-controlnet)


class A1111Unit:
    """The fields of sd-webui-controlnet's ControlParams that its UNet hook reads."""

    def __init__(
        self,
        hint,
        kind="ControlNet",
        name="tile_resample",
        weight=1.0,
        hr_hint=None,
        mask=None,
        cfg_injection=False,
        model=None,
    ):
        self.control_model = model if model is not None else PointwiseControl()
        self.control_model_type = SimpleNamespace(name=kind)
        self.preprocessor = {"name": name}
        self._hint_cond, self.hr_hint_cond, self.effective_region_mask = hint, hr_hint, mask
        self.weight, self.cfg_injection, self.global_average_pooling = weight, cfg_injection, False
        self.used_hint_cond = self.used_hint_cond_latent = None
        self.in_hires: list[bool] = []

    @property
    def hint_cond(self):
        return self._hint_cond

    @hint_cond.setter
    def hint_cond(self, value):  # as in ControlParams: the derived hints are made again
        self._hint_cond = value
        self.used_hint_cond = self.used_hint_cond_latent = None


class A1111ControlHook:
    """sd-webui-controlnet's UNet forward, as far as control goes: a shift per pixel."""

    def __init__(self, units: list[A1111Unit]):
        self.control_params = units
        self.vae_encodes = 0
        self.restored = 0

    def restore(self):  # what the script's postprocess calls: the UNet gets its forward back
        self.control_params = None
        self.restored += 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows, total = x.shape[0], torch.zeros(())
        for unit in self.control_params:
            hires = self._select_hint(unit, x)
            unit.in_hires.append(hires)
            if unit.control_model_type.name == "AttentionInjection":
                if unit.used_hint_cond_latent is None:  # its VAE-encoded reference, at this call's rows
                    self.vae_encodes += 1
                    latent = F.avg_pool2d(unit.used_hint_cond[:, 2:3], 8)
                    unit.used_hint_cond_latent = latent.expand(rows, *latent.shape[1:])
                assert unit.used_hint_cond_latent.shape[0] == rows, "attention banks are per row"
                total = total + unit.weight * unit.used_hint_cond_latent.mean()  # global, not spatial
                continue
            control = unit.control_model(unit.used_hint_cond)
            if unit.control_model_type.name == "T2I_Adapter" and unit.cfg_injection:
                control = torch.cat([control] * rows)  # what the hook does for such adapters
            control = control * unit.weight
            if unit.effective_region_mask is not None:
                control = control * F.interpolate(
                    unit.effective_region_mask, size=x.shape[-2:], mode="bilinear"
                )
            assert control.shape[0] in (1, rows) and control.shape[-2:] == x.shape[-2:]
            total = total + control
        return total

    @staticmethod
    def _select_hint(unit: A1111Unit, x: torch.Tensor) -> bool:
        """The hook's choice between hint_cond and hr_hint_cond: the nearer height wins, ties hires."""
        if unit.used_hint_cond is None:
            unit.used_hint_cond, unit.used_hint_cond_latent = unit.hint_cond, None
        if not torch.is_tensor(unit.hr_hint_cond):
            return False
        height = x.shape[-2] * 8
        hires = not abs(height - unit.hint_cond.shape[-2]) < abs(height - unit.hr_hint_cond.shape[-2])
        chosen = unit.hr_hint_cond if hires else unit.hint_cond
        if unit.used_hint_cond is not chosen:
            unit.used_hint_cond, unit.used_hint_cond_latent = chosen, None
        return hires


def a1111_scripts(hook: A1111ControlHook) -> SimpleNamespace:
    """p.scripts with sd-webui-controlnet's script, whose `latest_network` is its UNet hook."""
    return SimpleNamespace(alwayson_scripts=[SimpleNamespace(), SimpleNamespace(latest_network=hook)])


# ---------------------------------------------------------------- Forge (built-in ControlNet)


def adaptive_resize(samples, width, height, upscale_method, crop):
    """Forge's image_resize.adaptive_resize for 'center' crop: crop to the aspect, interpolate."""
    old_h, old_w = samples.shape[-2:]
    x = y = 0
    if old_w / old_h > width / height:
        x = round((old_w - old_w * (width / height) / (old_w / old_h)) / 2)
    elif old_w / old_h < width / height:
        y = round((old_h - old_h * (old_w / old_h) / (width / height)) / 2)
    return F.interpolate(
        samples[:, :, y : old_h - y, x : old_w - x], size=(height, width), mode=upscale_method
    )


def broadcast_image_to(tensor, target_batch_size, batched_number):
    """Forge's rule for a hint whose rows differ from x's: the first images, per chunk."""
    if tensor.shape[0] == 1:
        return tensor
    per_batch = target_batch_size // batched_number
    tensor = tensor[:per_batch]
    if per_batch > tensor.shape[0]:
        tensor = torch.cat(
            [tensor] * (per_batch // tensor.shape[0]) + [tensor[: per_batch % tensor.shape[0]]]
        )
    if tensor.shape[0] == target_batch_size:
        return tensor
    return torch.cat([tensor] * batched_number)


class ForgeControlNet:
    """Forge's ControlNet / T2IAdapter `get_control`, with a pointwise control model.

    Soft weighting ("My prompt / ControlNet is more important") scales each row by
    positive or negative weight according to `transformer_options['cond_mark']`.
    """

    def __init__(
        self, hint, previous=None, strength=1.0, soft=None, mask=None, t2i=False, name="tile_resample"
    ):
        self.model = PointwiseControl()  # a T2IAdapter keeps its result itself, in control_input
        self.cond_hint_original, self.cond_hint = hint, None
        self.previous_controlnet, self.strength, self.t2i, self.name = previous, strength, t2i, name
        self.positive_advanced_weighting, self.negative_advanced_weighting = soft or (None, None)
        self.advanced_mask_weighting = mask
        self.transformer_options: dict = {}
        self.full_size_calls, self.whole_latent = 0, (hint.shape[-2] // 8, hint.shape[-1] // 8)
        if t2i:
            self.control_input = None

    def chain(self) -> list[ForgeControlNet]:
        return [self] + (self.previous_controlnet.chain() if self.previous_controlnet else [])

    def get_control(self, x_noisy, t, cond, batched_number):
        previous = self.previous_controlnet
        control_prev = previous.get_control(x_noisy, t, cond, batched_number) if previous else None
        height, width = x_noisy.shape[2] * 8, x_noisy.shape[3] * 8
        if self.t2i:  # the adapter's size: a multiple of its unshuffle (64 px)
            height, width = math.ceil(height / 64) * 64, math.ceil(width / 64) * 64
        if self.cond_hint is None or tuple(self.cond_hint.shape[-2:]) != (height, width):
            self.cond_hint = adaptive_resize(
                self.cond_hint_original, width, height, "nearest-exact", "center"
            )
            if self.t2i:
                self.control_input = None
        if x_noisy.shape[0] != self.cond_hint.shape[0]:
            self.cond_hint = broadcast_image_to(self.cond_hint, x_noisy.shape[0], batched_number)
        if self.t2i:
            if self.control_input is None:
                self.control_input = self.model(self.cond_hint)
            control = self.control_input.clone()[..., : x_noisy.shape[2], : x_noisy.shape[3]]
        else:
            control = self.model(self.cond_hint)
        self.full_size_calls += tuple(x_noisy.shape[-2:]) == self.whole_latent
        control = control * self.strength
        if self.positive_advanced_weighting is not None:
            mark = self.transformer_options["cond_mark"]
            weight = self.positive_advanced_weighting * (1 - mark) + self.negative_advanced_weighting * mark
            control = control * weight[:, None, None, None]  # fails when the marks describe other rows
        mask = self.advanced_mask_weighting
        if torch.is_tensor(mask):
            control = control * F.interpolate(mask.to(control), size=control.shape[-2:], mode="bilinear")
        if control_prev is not None:
            control = control + control_prev["middle"][0]
        return {"input": [], "middle": [control], "output": []}
