"""A stand-in for the WebUI's X/Y/Z plot script (scripts/xyz_grid.py), rewritten for the tests.

A1111 1.10.1 and Forge 2 ship the same module here (Forge adds a "Distilled CFG Scale"
axis and its own checkpoint handling). What the extension relies on:

- the module's `axis_options` list, read when the plot builds its controls; extensions
  find the module through `modules.scripts.scripts_data` (entries with `path` and `module`);
- `AxisOption(label, type, apply, format_value=..., confirm=None, cost=0.0, choices=None,
  prepare=None)`, and `AxisOptionImg2Img` / `AxisOptionTxt2Img` that set `is_img2img`;
- `run()`: each axis's text split as CSV (or the dropdown's list for an axis with choices),
  int and float axes expanded from range syntax ("1-5 (+2)", "1-10 [4]"), every value
  converted by the axis's `type`, then `confirm(p, values)` for each axis before any cell;
- each cell: `pc = copy(p)`, every axis's `apply(pc, value, values)`, `process_images(pc)`.
"""

from __future__ import annotations

import copy
import csv
import re
import types
from io import StringIO

RANGE = re.compile(r"\s*([+-]?[\d.]+)\s*-\s*([+-]?[\d.]+)\s*(?:\(\s*\+\s*([\d.]+)\s*\)|\[\s*(\d+)\s*\])?\s*")


class AxisOption:
    def __init__(
        self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None
    ):
        self.label, self.type, self.apply = label, type, apply
        self.format_value, self.confirm, self.cost = format_value, confirm, cost
        self.choices, self.prepare = choices, prepare


class AxisOptionImg2Img(AxisOption):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_img2img = True


class AxisOptionTxt2Img(AxisOption):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_img2img = False


def module(forge: bool = False) -> types.ModuleType:
    """A fresh xyz_grid module with a few of the WebUI's own axes."""
    xyz = types.ModuleType("xyz_grid.py")
    xyz.AxisOption, xyz.AxisOptionImg2Img, xyz.AxisOptionTxt2Img = (
        AxisOption,
        AxisOptionImg2Img,
        AxisOptionTxt2Img,
    )
    xyz.axis_options = [
        AxisOption("Nothing", str, lambda p, x, xs: None),
        AxisOption("Seed", int, lambda p, x, xs: setattr(p, "seed", x)),
        AxisOptionImg2Img("Denoising", float, lambda p, x, xs: setattr(p, "denoising_strength", x)),
    ]
    if forge:
        xyz.axis_options.append(AxisOption("Distilled CFG Scale", float, lambda p, x, xs: None))
    return xyz


def options_for(xyz: types.ModuleType, is_img2img: bool) -> list:
    """The axes the plot offers on a tab (its ui(): plain axes and those of the tab)."""
    return [o for o in xyz.axis_options if type(o) is AxisOption or o.is_img2img == is_img2img]


def values(option: AxisOption, text: str, dropdown: list | None = None, p=None) -> list:
    """An axis's values as the plot reads them before the first cell (and confirms them)."""
    if option.choices is not None and dropdown is not None:
        raw = list(dropdown)
    else:
        raw = [v.strip() for row in csv.reader(StringIO(text), skipinitialspace=True) for v in row]
    if option.type in (int, float):
        expanded = []
        for value in raw:
            if not value.strip():
                continue
            match = RANGE.fullmatch(value)
            if match is None:
                expanded.append(value)
                continue
            start, end = option.type(match[1]), option.type(match[2])
            if match[4]:  # [count]: evenly spaced
                count = int(match[4])
                expanded += [option.type(start + (end - start) * i / max(count - 1, 1)) for i in range(count)]
            else:
                step = option.type(match[3] or 1)
                value = start
                while value <= end + 1e-9:
                    expanded.append(value)
                    value += step
        raw = expanded
    converted = [option.type(v) for v in raw]
    if option.confirm:
        option.confirm(p, converted)
    return converted


def run(p, process, x: tuple, y: tuple | None = None) -> list:
    """The plot over one or two axes, each `(option, text)` or `(option, text, dropdown)`:
    the values confirmed first, then each cell processed on its own copy of p."""
    axes = [a for a in (x, y) if a is not None]
    lists = [values(a[0], a[1], a[2] if len(a) > 2 else None, p) for a in axes]
    results = []
    for ys in lists[1] if len(lists) > 1 else [None]:
        for xs in lists[0]:
            pc = copy.copy(p)
            axes[0][0].apply(pc, xs, lists[0])
            if ys is not None:
                axes[1][0].apply(pc, ys, lists[1])
            results.append(process(pc))
    return results
