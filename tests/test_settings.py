"""Settings: one declaration per parameter, validated everywhere it enters."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

import tiled_diffusion as td
from tiled_diffusion.settings import JOB_STRENGTH, PARAMETERS, PARAMETERS_BY_NAME
from tiled_diffusion.strength import read_strength_map
from tiled_diffusion.ui import NOTES, pasted_map_note

from . import fake_a1111 as fake
from . import fake_webui_infotext as webui_infotext
from .images import png_base64

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
    args = [True, "MultiDiffusion", 50, 64, 256, 32, 2, 100, "Keep latent", True, 0.2, 0.6]
    args += [320, "Lanczos", 1.5, False, 2048, 512]  # appended later: min_window, upscale, VAE
    args += ["Words where they are", "0 0 0.5 1: a red barn"]  # window prompts, regions
    args += [png_base64(Image.new("L", (8, 8), 128))]  # strength map
    settings = td.Settings.from_args(args)
    assert settings.as_args()[:-1] == args[:-1]
    assert settings.strength_map == read_strength_map(args[-1]) and settings.strength_map.pixels.max() == 128
    older = td.Settings.from_args(args[:12])  # the API list before min_window was added
    assert older.as_args() == args[:12] + td.Settings().as_args()[12:]
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
        ([{"enable": True}], "'enable': unknown argument"),
        ([True] + [None] * len(PARAMETERS), f"{len(PARAMETERS) + 1} values given, at most {len(PARAMETERS)}"),
        (["false"], "enabled: 'false' is not allowed"),
        ([True, "MultiDiffusion", "sixty-four"], "detail_threshold: 'sixty-four'"),
    ],
)
def test_bad_api_args_name_the_argument(args, message):
    with pytest.raises(td.SettingsError, match=re.escape(message)):
        td.Settings.from_args(args)


# Every parameter off its default; as most jobs write it, once with variable denoise off.
JOB = td.Settings(
    enabled=True,
    method="MultiDiffusion",
    detail_threshold=72.5,
    min_tile=64,
    max_tile=256,
    overlap=32,
    tile_batch=2,
    skip_below=100,
    skip_mode="Keep latent",
    variable_denoise=True,
    denoise_largest=0.25,
    denoise_smallest=0.8,
    window_prompts="Words where they are",
    regions="0 0 0.5 1: a red barn, (wooden:1.2)\n0.5 0 1 1: a wheat field: golden",
)
JOBS = (
    JOB,
    dataclasses.replace(JOB, variable_denoise=False),
    dataclasses.replace(JOB, window_prompts="Whole prompt", regions=""),
)


@pytest.fixture
def scripts(state, monkeypatch):
    """The script of each tab, its controls built: {tab: (script, controls)}."""
    monkeypatch.setitem(sys.modules, "gradio", webui_infotext.gradio)
    built = {}
    for tab in ("txt2img", "img2img"):
        script = fake.load_script()
        built[tab] = script, script.ui(tab == "img2img")
    return built


def run_job(script, tab: str, args):
    """The job the script starts from these args, as the WebUI runs process(); and its p."""
    p = fake.processing([Image.new("RGB", (512, 384), "gray")] if tab == "img2img" else None)
    script.process(p, *args)
    return script.job, p


def job_infotext(script, tab: str, settings: td.Settings) -> str:
    """The infotext the WebUI writes for a job with these settings."""
    _, p = run_job(script, tab, settings.as_args())
    own = {"Steps": 20, "Sampler": "DPM++ 2M", "CFG scale": 7, "Seed": 1, "Size": "512x384"}
    generation = {**own, "Denoising strength": p.denoising_strength, **p.extra_generation_params}
    return webui_infotext.write("a photo, detailed", "blurry", {**generation, "Version": "v1.10.1"})


def test_infotext_is_flat_scalars():
    with_map = dataclasses.replace(JOB, strength_map=Image.linear_gradient("L").resize((64, 48)))
    info = with_map.infotext()
    assert all(isinstance(v, (bool, int, float, str)) for v in info.values())
    assert len(set(info)) == len(PARAMETERS)
    key = PARAMETERS_BY_NAME["strength_map"].infotext_key
    assert info[key] == f"{with_map.strength_map.digest} (64x48 px)"  # what a re-run must send again
    assert key not in JOB.infotext()


def test_a_job_without_regions_pastes_back_no_regions():
    regions = PARAMETERS_BY_NAME["regions"]
    info = {k: str(v) for k, v in td.Settings(enabled=True).infotext().items()}
    assert regions.infotext_key not in info  # an empty value is left out (the WebUI drops it)
    assert regions.read_infotext(info) == ""  # so that pasting it clears the regions box
    assert regions.read_infotext({"Steps": "20"}) is None  # no Quadtree job: leave the box alone


@pytest.mark.parametrize("tab", ["txt2img", "img2img"])
def test_job_infotext_sent_back_through_the_api_or_pasted_gives_the_same_settings(scripts, tab):
    script, controls = scripts[tab]
    other = webui_infotext.Component(value=False)  # another script's control, before ours
    inputs = [None, other, *controls]
    fields = [(webui_infotext.Component(value=""), "Prompt"), (other, "Other setting")]
    fields += script.infotext_fields
    for settings in JOBS:
        infotext = job_infotext(script, tab, settings)
        args = webui_infotext.api_script_args(infotext, fields, inputs)
        assert run_job(script, tab, args[2:])[0].settings == settings, infotext
        pasted = webui_infotext.paste(infotext, fields)
        values = [pasted.get(control, control.value) for control in controls]
        assert run_job(script, tab, values)[0].settings == settings, infotext


def test_send_to_img2img_copies_every_setting(scripts):
    # The WebUI copies the fields whose name is in paste_field_names, compared with ==.
    (source, sent), (target, received) = scripts["txt2img"], scripts["img2img"]
    pairs = webui_infotext.send_to(source.infotext_fields, target.infotext_fields, source.paste_field_names)
    assert pairs == list(zip(sent, received))


def test_readme_parameter_table_matches_the_declarations():
    rows = [
        line.strip("| ").split(" | ")
        for line in README.read_text().splitlines()
        if re.match(r"\| \d+ \|", line)
    ]
    assert [(int(row[0]), row[1].strip("`")) for row in rows] == list(enumerate(PARAMETERS_BY_NAME))
    for (_, _, default, allowed, label, key, what), p in zip(rows, PARAMETERS):
        assert default.strip("`") == repr_default(p.default), p.name
        assert allowed.replace('"', "'") == p.allowed(), p.name
        assert (label, key.strip("`"), what) == (p.label, p.infotext_key, p.help), p.name


def test_readme_and_ui_note_state_the_job_strength_as_declared():
    paragraphs = [" ".join(text.split()) for text in README.read_text().split("\n\n")]
    stating = [text for text in paragraphs if "the job runs at" in text]
    assert len(stating) == 2, "the variable denoise paragraph and the parameter table"
    assert all(JOB_STRENGTH in text for text in stating)
    assert JOB_STRENGTH in PARAMETERS_BY_NAME["variable_denoise"].help
    assert NOTES["variable denoise"] == JOB_STRENGTH


def repr_default(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if value is None:
        return "none"
    return f"{value:g}"


def test_pasting_a_job_with_a_strength_map_says_to_load_the_map_and_keeps_the_loaded_one(scripts):
    script, controls = scripts["img2img"]
    used = dataclasses.replace(JOB, strength_map=Image.linear_gradient("L").resize((64, 48)))
    infotext = webui_infotext.write("a photo", "", {"Steps": 20, **used.infotext()})
    pasted = webui_infotext.paste(infotext, script.infotext_fields)
    note = next(component for component, reader in script.infotext_fields if reader is pasted_map_note)
    assert f"strength map **{used.strength_map.digest} (64x48 px)**: load the same picture" in pasted[note]
    map_control = controls[list(PARAMETERS_BY_NAME).index("strength_map")]
    assert pasted.get(map_control) is None, "a loaded map is left as it is"
    plain = webui_infotext.write("a photo", "", {"Steps": 20, **JOB.infotext()})
    assert webui_infotext.paste(plain, script.infotext_fields)[note] == ""
