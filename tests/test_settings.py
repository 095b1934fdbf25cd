"""Settings: one declaration per parameter, validated everywhere it enters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import tiled_diffusion as td
from tiled_diffusion.settings import PARAMETERS, PARAMETERS_BY_NAME

README = Path(__file__).parent.parent / "README.md"


def test_defaults_are_valid_and_match_the_declarations():
    settings = td.Settings()
    for p in PARAMETERS:
        assert getattr(settings, p.name) == p.default
    assert settings.as_args() == [p.default for p in PARAMETERS]
    assert PARAMETERS[0].name == "enabled", "the API list starts with the enable switch"


@pytest.mark.parametrize(
    "name, value, allowed",
    [
        ("enabled", "false", "true or false"),
        ("enabled", 1, "true or false"),
        ("method", "Mixture", "one of 'MultiDiffusion', 'Mixture of Diffusers'"),
        ("detail_threshold", 0.5, "from 1 to 200"),
        ("detail_threshold", "high", "a number"),
        ("detail_threshold", float("nan"), "a number"),
        ("min_tile", 100, "in steps of 8"),
        ("min_tile", 32, "from 64 to 2048"),
        ("min_tile", 128.5, "an integer"),
        ("max_tile", 8192, "from 128 to 4096"),
        ("overlap", -8, "from 0 to 512"),
        ("overlap", 12, "in steps of 8"),
        ("tile_batch", 0, "from 1 to 32"),
        ("tile_batch", True, "an integer"),
        ("skip_below", 4096, "from 0 to 2048"),
        ("skip_mode", "keep pixels", "one of 'Keep pixels', 'Keep latent'"),
        ("variable_denoise", None, "true or false"),
        ("denoise_largest", 1.5, "from 0 to 1"),
        ("denoise_smallest", -0.1, "from 0 to 1"),
    ],
)
def test_bad_value_names_the_parameter_the_value_and_what_is_allowed(name, value, allowed):
    with pytest.raises(td.SettingsError) as error:
        td.Settings(**{name: value})
    message = str(error.value)
    assert message.startswith(f"{name}: {value!r}") and allowed in message


def test_integer_valued_floats_from_sliders_are_accepted():
    settings = td.Settings(min_tile=128.0, tile_batch=4.0, denoise_largest=1)
    assert settings.min_tile == 128 and isinstance(settings.min_tile, int)
    assert isinstance(settings.denoise_largest, float)


def test_max_tile_must_be_twice_min_tile():
    with pytest.raises(td.SettingsError, match="max_tile: 512 .* twice min_tile"):
        td.Settings(min_tile=512, max_tile=512)


def test_positional_api_args_follow_the_declared_order():
    args = [True, "MultiDiffusion", 50, 64, 256, 32, 2, 100, "Keep latent", True, 0.2, 0.6, 320]
    settings = td.Settings.from_args(args)
    assert settings.as_args() == args
    older = td.Settings.from_args(args[:12])  # the API list before min_window was added
    assert older.as_args() == args[:12] + [td.Settings().min_window]
    short = td.Settings.from_args([True, "MultiDiffusion"])
    assert short.enabled and short.method == "MultiDiffusion" and short.min_tile == td.Settings().min_tile


def test_named_api_args_take_defaults_for_omitted_names():
    settings = td.Settings.from_args([{"enabled": True, "skip_below": 256}])
    assert settings == td.Settings(enabled=True, skip_below=256)


@pytest.mark.parametrize(
    "args, message",
    [
        ("enabled", "args: expected a list"),
        ({"enabled": True}, "args: expected a list"),
        ([{"enable": True}], "enable: unknown argument"),
        ([True] + [None] * len(PARAMETERS), f"{len(PARAMETERS) + 1} values given, at most {len(PARAMETERS)}"),
        (["false"], "enabled: 'false' is not allowed"),
        ([True, "MultiDiffusion", "sixty-four"], "detail_threshold: 'sixty-four'"),
    ],
)
def test_bad_api_args_name_the_argument(args, message):
    with pytest.raises(td.SettingsError, match=re.escape(message)):
        td.Settings.from_args(args)


def test_infotext_is_flat_scalars_and_reads_back_exactly():
    settings = td.Settings(
        enabled=True,
        method="MultiDiffusion",
        detail_threshold=72.5,
        skip_below=200,
        skip_mode="Keep latent",
        variable_denoise=True,
        denoise_largest=0.25,
        denoise_smallest=0.8,
    )
    info = settings.infotext()
    assert all(isinstance(v, (bool, int, float, str)) for v in info.values())
    assert len(set(info)) == len(PARAMETERS)
    pasted = {key: str(value) for key, value in info.items()}  # PNG Info hands back strings
    assert td.Settings.from_infotext(pasted) == settings
    assert td.Settings.from_infotext({}) == td.Settings()


def test_readme_parameter_table_matches_the_declarations():
    text = README.read_text()
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| (.+?) \| (.+?) \|", text, flags=re.M)
    assert [(int(i), name) for i, name, _, _ in rows] == list(enumerate(PARAMETERS_BY_NAME))
    for _, name, default, _ in rows:
        assert default.strip("` ") == repr_default(PARAMETERS_BY_NAME[name].default)


def repr_default(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return f"{value:g}"
