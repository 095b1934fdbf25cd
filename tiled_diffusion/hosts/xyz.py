"""X/Y/Z plot axes for the extension's parameters, in A1111 and Forge.

Both WebUIs ship the same `scripts/xyz_grid.py`. Its module holds the list `axis_options`,
read when the plot builds its controls, and the classes `AxisOption` (both tabs) and
`AxisOptionImg2Img` (label, value type, `apply(p, value, values)`, `confirm(p, values)`,
`choices`). The plot checks every axis's values with `confirm` before the first cell, then
runs each cell on a shallow copy of the job's `p` and calls each axis's `apply` on it.

Our `apply` puts the value into an override dict on that copy, which `webui.settings_of`
lays over the script's own args wherever the job reads its settings. No axis depends on
where the script's args sit in the args list, and the override goes with the cell's copy.
Values are checked as the API checks them (`Param.convert`), so a bad one stops the plot
with the API's message. An axis never turns the extension on: the plot is refused when it
is off (see README, "X/Y/Z plot").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from ..settings import PARAMETERS_BY_NAME, TITLE, XYZ_AXES, XYZ_IMG2IMG_ONLY, Param, Settings, SettingsError
from . import webui

PREFIX = "[Quadtree]"


def label(param: Param) -> str:
    """The axis label: "[Quadtree] Min tile"."""
    return f"{PREFIX} {param.label}"


def find_xyz_grid(scripts_data: Iterable[Any]) -> Any | None:
    """The module of the WebUI's X/Y/Z plot script among the loaded scripts, or None."""
    for data in scripts_data:
        if os.path.basename(getattr(data, "path", "") or "") == "xyz_grid.py" and hasattr(data, "module"):
            return data.module
    return None


def register(scripts_data: Iterable[Any], upscalers: Callable[[], list[str] | None]) -> bool:
    """Add our axes to the X/Y/Z plot (once: a second call adds nothing). False when the
    WebUI has no X/Y/Z plot script loaded.

    upscalers: gives the names of the WebUI's upscalers (they can change while it runs)."""
    module = find_xyz_grid(scripts_data)
    if module is None:
        return False
    known = {getattr(option, "label", None) for option in module.axis_options}
    for name in XYZ_AXES:
        param = PARAMETERS_BY_NAME[name]
        if label(param) in known:
            continue
        kind = module.AxisOptionImg2Img if name in XYZ_IMG2IMG_ONLY else module.AxisOption
        module.axis_options.append(
            kind(
                label(param),
                value_type(param),
                apply_value(name),
                confirm=confirm_values(param, upscalers),
                choices=choices(param, upscalers),
            )
        )
    return True


def value_type(param: Param) -> Callable[[str], Any]:
    """What the plot turns each typed value into. Numbers use the plot's own int and float,
    so its range syntax works ("64-256 (+64)", "0.1-0.5 [5]"); a bool reads "True" or
    "False", and anything else is passed on for `confirm` to refuse with the API's message."""
    if param.kind is bool:
        return _bool_text
    if param.kind in (int, float):
        return param.kind
    return str


def _bool_text(text: str) -> Any:
    return {"true": True, "false": False}.get(text.strip().lower(), text)


def choices(param: Param, upscalers: Callable[[], list[str] | None]) -> Callable[[], list[str]] | None:
    """The plot's dropdown values for a parameter of choices; None for numbers."""
    if param.choices:
        return lambda: list(param.choices)
    if param.kind is bool:
        return lambda: ["True", "False"]
    if param.names:
        return lambda: list(upscalers() or ["None"])
    return None


def apply_value(name: str) -> Callable[[Any, Any, list], None]:
    def apply(p: Any, value: Any, values: list) -> None:
        # A new dict each time: the cell's copy of p must not write into a dict it shares.
        setattr(p, webui.XYZ_OVERRIDES, {**webui.overrides_of(p), name: value})

    return apply


def confirm_values(param: Param, upscalers: Callable[[], list[str] | None]) -> Callable[[Any, list], None]:
    """Check an axis's values before the plot starts: each as the API checks it, and that
    the extension is on for the job."""

    def confirm(p: Any, values: list) -> None:
        for value in values:
            try:
                param.convert(value)
                if param.names:
                    Settings(upscaler=value).check_upscaler(upscalers())
            except SettingsError as error:
                raise SettingsError(f"{TITLE}: {error}") from None
        settings = job_settings(p)
        if settings is not None and not settings.enabled:
            raise SettingsError(
                f"{TITLE}: the X/Y/Z plot axis {label(param)!r} sets a parameter of this extension, "
                'which is off for this job: tick its Enabled checkbox (API: "enabled": true in its '
                "alwayson_scripts args) and run the plot again"
            )

    return confirm


def job_settings(p: Any) -> Settings | None:
    """The settings the job's own script args give (the accordion, or the API's alwayson
    args), or None when they cannot be read here (then the job itself checks them)."""
    runner = getattr(p, "scripts", None)
    for script in getattr(runner, "alwayson_scripts", None) or []:
        if script.title() == TITLE:
            try:
                return webui.settings_of(None, p.script_args[script.args_from : script.args_to])
            except (SettingsError, TypeError, AttributeError):
                return None
    return None
