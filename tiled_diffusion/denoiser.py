"""The tiled denoiser: x0-space, tile by tile, with skip and variable denoise."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from itertools import groupby
from typing import Any

import torch

from .blend import weight_sum, window_weights
from .plan import Plan, Window
from .prompts import WindowPrompt
from .strength import pixel_starts

# A host's conditioning of one window: given the window's prompt, the call's conditioning
# keyword arguments and its row count, the same arguments with the cond rows made from the
# window's prompt (uncond rows untouched).
WindowConditioning = Callable[[WindowPrompt, dict, int], dict]

NO_ORIGINAL_NOTE = (
    "Quadtree Tiled Diffusion: no original image (txt2img without hires fix), "
    "so skip and variable denoise are off; every tile is denoised."
)


class TiledDenoiser:
    """Drop-in replacement for a k-diffusion denoiser `model(x, sigma, **cond) -> x0`.

    `row_images(x, B)` says which image of the original each row of x belongs to; by
    default row i belongs to image i % B (a host with another row layout passes its own).

    Each active window is denoised by `model` over its view, and its bands take part in
    the blend; inactive (skipped or not yet started) tiles return the clean `original`,
    which keeps them exactly on the re-noised original under every sampler. The result is

        D = o + sum_active w_i (D_i - o) / sum_all w_i

    with w_i the band weights, so pixels outside every active band are exactly `o`.
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        plan: Plan,
        original: torch.Tensor | None = None,
        progress: Callable[[int, int], None] | None = None,
        row_images: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
        around_batch: Callable[[list[Window], int], AbstractContextManager] | None = None,
        window_cond: WindowConditioning | None = None,
    ):
        self.model = model
        self.plan = plan
        self.progress = progress
        self.row_images = row_images or _rows_in_turn
        # Set up (and undo) what a host computes beside the model for a batch of windows,
        # e.g. ControlNet hints cut to the windows; given the batch and its rows per window.
        self.around_batch = around_batch or (lambda batch, rows: nullcontext())
        # Windows whose prompt differs from the job's get their own cond rows from the host.
        self.window_cond = window_cond
        self.tile_batch = plan.settings.tile_batch  # a host may lower it for one pass
        self.notes: list[str] = []
        # shared_views: windows served by another window's evaluation of the same view
        self.stats = {"calls": 0, "model_calls": 0, "evaluated_pixels": 0, "shared_views": 0}
        if original is not None:
            _check_latent("original", original, plan)
        elif plan.uses_original:
            self.notes.append(NO_ORIGINAL_NOTE)
            warnings.warn(NO_ORIGINAL_NOTE, stacklevel=2)
        if original is not None and any(leaf.start_sigma is None for leaf in plan.leaves):
            raise ValueError("plan: variable denoise needs the sampler's sigmas; pass sigmas= to build_plan")
        self.original = original
        self._device_cache: dict[Any, tuple] = {}
        self._starts: dict[tuple, torch.Tensor] = {}  # pixel start sigmas per (window strength, device)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        _check_latent("x", x, self.plan)
        rows = x.shape[0]
        level = _sigma_value(sigma)
        weights, weight_sum, original = self._on_device(x.device)
        if original is not None:
            if original.shape[1] != x.shape[1]:
                raise ValueError(f"x: {x.shape[1]} channels but the original has {original.shape[1]}")
            images = self.row_images(x, original.shape[0])
            if not (
                rows == original.shape[0] and torch.equal(images, torch.arange(rows, device=images.device))
            ):
                original = original[images]  # one row per row of x (no copy when they already match)
        windows = [
            w
            for w in self.plan.windows
            if original is None
            or (self.plan.leaves[w.leaves[0]].changes and self.plan.leaves[w.leaves[0]].is_active(level))
        ]
        gates = self._pixel_gates(level, windows, x.device) if original is not None else {}
        if gates:  # a window none of whose band pixels has started is not evaluated
            windows = [w for w in windows if gates[id(w)] is not None]
        conds = self._window_conds(windows, cond, rows)
        self.stats["calls"] += 1
        # The blend follows the order of the windows batched by shape; a view shared by
        # several windows (the same crop with the same conditioning) is evaluated once, the
        # first time one of them is reached, and serves the others in their own turn.
        order = _by_shape(windows, conds)
        keys = {id(w): (w.x, w.y, w.w, w.h, id(conds[id(w)])) for w in order}
        last_use = {keys[id(w)]: i for i, w in enumerate(order)}
        views: dict[tuple, Window] = {}
        for w in order:
            views.setdefault(keys[id(w)], w)
        batches = iter(_batches(list(views.values()), self.tile_batch, conds))
        outputs: dict[tuple, tuple[torch.Tensor, int]] = {}  # key -> (model output, row block)
        acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        done = 0
        for i, w in enumerate(order):
            key = keys[id(w)]
            while key not in outputs:
                batch = next(batches)
                out = self._evaluate(batch, x, sigma, conds, rows)
                outputs.update((keys[id(v)], (out, j)) for j, v in enumerate(batch))
                done += len(batch)
                if self.progress:
                    self.progress(done, len(views))
            out, j = outputs[key]
            if last_use[key] == i:
                del outputs[key]
            else:
                self.stats["shared_views"] += 1
            for b in w.bands:
                region = (slice(None), slice(None), slice(b.y, b.y + b.h), slice(b.x, b.x + b.w))
                in_view = (slice(b.y - w.y, b.y - w.y + b.h), slice(b.x - w.x, b.x - w.x + b.w))
                denoised = out[j * rows : (j + 1) * rows, :, in_view[0], in_view[1]].float()
                if original is not None:
                    denoised = denoised - original[region]
                weight = weights[(b.h, b.w)]
                if gates:  # pixels not started yet keep the original
                    weight = weight * gates[id(w)][region[2:]]
                acc[region] += denoised * weight
        acc /= weight_sum
        if original is not None:
            acc += original
        return acc.to(x.dtype)

    def _evaluate(
        self, batch: list[Window], x: torch.Tensor, sigma: Any, conds: dict, rows: int
    ) -> torch.Tensor:
        """The model's output for a batch of views: `rows` rows per view, view after view."""
        crops = torch.cat([x[:, :, w.y : w.y + w.h, w.x : w.x + w.w] for w in batch])
        batch_cond = _batch_conds([conds[id(w)] for w in batch], batch, rows, self.plan.latent_size)
        with self.around_batch(batch, rows):
            out = self.model(crops, _repeat_rows(sigma, rows, len(batch)), **batch_cond)
        if out.shape != crops.shape:
            raise ValueError(f"model returned shape {tuple(out.shape)} for input {tuple(crops.shape)}")
        self.stats["model_calls"] += 1
        self.stats["evaluated_pixels"] += sum(w.w * w.h for w in batch)
        return out

    def _pixel_gates(
        self, level: float, windows: list[Window], device: torch.device
    ) -> dict[int, torch.Tensor | None]:
        """With pixel strengths: for each window (by id), which latent pixels have started at
        this noise level for its strength ([H, W], 1 or 0), or None when none of its bands has."""
        plan = self.plan
        if plan.pixel_strength is None:
            return {}
        gates: dict[int, torch.Tensor | None] = {}
        by_strength: dict[float, torch.Tensor] = {}  # this call's gate of each window strength
        for w in windows:
            strength = plan.window_strength(w)
            if strength not in by_strength:
                key = (strength, device)
                if key not in self._starts:
                    starts = pixel_starts(
                        plan.pixel_strength.double() * strength,
                        plan.job_strength,
                        plan.sigmas,
                        plan.start_rule,
                    )
                    self._starts[key] = starts.float().to(device)
                by_strength[strength] = (
                    level <= self._starts[key] * (1 + 1e-3)
                ).float()  # Leaf.is_active's rule
            gate = by_strength[strength]
            started = any(bool(gate[b.y : b.y + b.h, b.x : b.x + b.w].any()) for b in w.bands)
            gates[id(w)] = gate if started else None
        return gates

    def _window_conds(self, windows: list[Window], cond: dict, rows: int) -> dict[int, dict]:
        """Each window's conditioning (by id): the call's own, or the host's for its prompt
        (computed once per distinct prompt and call)."""
        by_prompt: dict[WindowPrompt, dict] = {WindowPrompt(): cond}
        conds = {}
        for w in windows:
            prompt = self.plan.leaves[w.leaves[0]].prompt
            if prompt not in by_prompt:
                if self.window_cond is None:
                    raise ValueError("plan: windows have prompts of their own, but no window_cond was given")
                by_prompt[prompt] = self.window_cond(prompt, cond, rows)
            conds[id(w)] = by_prompt[prompt]
        return conds

    def _on_device(self, device: torch.device) -> tuple:
        """Weight maps, their sum over all windows and the original, moved once per device."""
        if device not in self._device_cache:
            method = self.plan.settings.method
            shapes = {(b.h, b.w) for w in self.plan.windows for b in w.bands}
            weights = {s: window_weights(method, *s).to(device) for s in shapes}
            original = None if self.original is None else self.original.to(device, torch.float32)
            # Windows that change nothing leave the blend; a pixel only they reach keeps the original.
            total = weight_sum(self.plan, lambda leaf: leaf.changes)
            total[total == 0] = 1.0
            self._device_cache[device] = (weights, total.to(device), original)
        return self._device_cache[device]


def _check_latent(name: str, latent: torch.Tensor, plan: Plan) -> None:
    if not isinstance(latent, torch.Tensor) or latent.ndim != 4:
        raise ValueError(
            f"{name}: expected a latent tensor [N, C, H, W], got {getattr(latent, 'shape', type(latent))}"
        )
    if latent.numel() == 0:
        raise ValueError(f"{name}: the latent {tuple(latent.shape)} is empty")
    height, width = plan.latent_size
    if tuple(latent.shape[-2:]) != (height, width):
        raise ValueError(
            f"{name}: latent is {latent.shape[-1]}x{latent.shape[-2]} but the plan was built for "
            f"{width}x{height} latent px"
        )


def _rows_in_turn(x: torch.Tensor, images: int) -> torch.Tensor:
    """Row i belongs to image i % B: cond rows then uncond rows, each in image order."""
    if x.shape[0] % images:
        raise ValueError(f"x: {x.shape[0]} rows is not a multiple of the original's {images} images")
    return torch.arange(x.shape[0], device=x.device) % images


def _sigma_value(sigma: torch.Tensor | float) -> float:
    """The one noise level of this call (hosts give every row the same sigma)."""
    values = torch.as_tensor(sigma, dtype=torch.float64).flatten()
    if values.numel() == 0 or not torch.isfinite(values).all():
        raise ValueError(f"sigma: expected finite noise levels, got {sigma}")
    if (values != values[0]).any():
        raise ValueError(f"sigma: rows must share one noise level, got {values.tolist()}")
    return float(values[0])


def _shape_key(w: Window, conds: dict[int, dict] | None) -> tuple:
    return w.h, w.w, _shapes(conds[id(w)]) if conds else ()


def _by_shape(windows: list[Window], conds: dict[int, dict] | None = None) -> list[Window]:
    """The windows grouped by view shape and conditioning shapes, otherwise in plan order."""
    return sorted(windows, key=lambda w: _shape_key(w, conds))


def _batches(windows: list[Window], size: int, conds: dict[int, dict] | None = None) -> list[list[Window]]:
    """Windows of equal shape and conditioning shapes, `size` at a time."""
    batches = []
    for _, group in groupby(_by_shape(windows, conds), key=lambda w: _shape_key(w, conds)):
        group = list(group)
        batches += [group[i : i + size] for i in range(0, len(group), size)]
    return batches


def _shapes(value: Any) -> tuple:
    """The shapes of the tensors in a conditioning structure (windows batched together need equal ones)."""
    if isinstance(value, dict):
        return tuple((k, _shapes(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_shapes(v) for v in value)
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return ()


def _repeat_rows(value: Any, rows: int, times: int) -> Any:
    """A per-row tensor repeated once per window of the batch; anything else unchanged."""
    if times > 1 and isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == rows:
        return torch.cat([value] * times)
    return value


def _batch_conds(values: list[Any], batch: list[Window], rows: int, latent_size: tuple[int, int]) -> Any:
    """Conditioning for a batch of windows, each with its own (of equal shapes; most often the
    call's own for all): spatial maps cropped, per-row tensors laid out window after window,
    anything else the first's. Containers are rebuilt only where something inside changed:
    shared option dicts (Forge's transformer_options) must stay the very same object."""
    first = values[0]
    if isinstance(first, dict):
        new = {k: _batch_conds([v[k] for v in values], batch, rows, latent_size) for k in first}
        return first if all(new[k] is v for k, v in first.items()) else new
    if isinstance(first, (list, tuple)):
        new = [_batch_conds([v[i] for v in values], batch, rows, latent_size) for i in range(len(first))]
        return first if all(a is b for a, b in zip(new, first)) else type(first)(new)
    if isinstance(first, torch.Tensor) and first.ndim == 4 and tuple(first.shape[-2:]) == latent_size:
        return torch.cat([v[:, :, w.y : w.y + w.h, w.x : w.x + w.w] for v, w in zip(values, batch)])
    if isinstance(first, torch.Tensor) and first.ndim >= 1 and first.shape[0] == rows:
        return torch.cat(values) if len(values) > 1 else first
    return first
