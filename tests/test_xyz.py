"""X/Y/Z plot axes: registered in both WebUIs, values checked as the API checks them, each
cell's job run with its values (and its infotext recording them), nothing left behind."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

import tiled_diffusion as td
from tiled_diffusion.hosts import webui, xyz
from tiled_diffusion.hosts.api import payload_error
from tiled_diffusion.settings import PARAMETERS_BY_NAME, TITLE, XYZ_AXES

from . import fake_a1111 as fake
from . import fake_webui_infotext as infotext
from . import fake_xyz_grid
from .test_upscale import photo

ROOT = Path(__file__).parent.parent


def loaded_scripts(grid: types.ModuleType, host: str) -> list:
    """modules.scripts.scripts_data with the plot among other scripts, as the host loads them."""
    root = "/stable-diffusion-webui" if host == "A1111" else "/stable-diffusion-webui-forge"
    return [
        SimpleNamespace(
            script_class=object,
            path=f"{root}/scripts/prompt_matrix.py",
            basedir=root,
            module=types.ModuleType("x"),
        ),
        SimpleNamespace(script_class=object, path=f"{root}/scripts/xyz_grid.py", basedir=root, module=grid),
    ]


@pytest.fixture(params=["A1111", "Forge"])
def plot(request, state):
    grid = fake_xyz_grid.module(forge=request.param == "Forge")
    script = fake.load_script(loaded_scripts(grid, request.param))
    return SimpleNamespace(grid=grid, script=script, host=request.param)


def axis(grid, name: str, tab_img2img: bool = True):
    label = xyz.label(PARAMETERS_BY_NAME[name])
    return next(o for o in fake_xyz_grid.options_for(grid, tab_img2img) if o.label == label)


def job_p(script, our_args: list, **fields):
    """An img2img job's p as the WebUI hands it to the plot: script args of every script,
    ours at the place the script runner gave them."""
    p = fake.processing([photo(512, 384)], width=512, height=384, **fields)
    p.script_args = [0, "another script's value", *our_args]
    script.args_from, script.args_to = 2, 2 + len(our_args)
    p.scripts = SimpleNamespace(alwayson_scripts=[script])
    return p


def run_cell(script, args):
    """What process_images does with our script for one cell; the cell's job, its infotext."""

    def process(pc):
        script.before_process(pc, *args)
        script.process(pc, *args)
        job = script.job
        text = infotext.write("a photo", "", dict(pc.extra_generation_params))
        script.postprocess(pc, None, *args)
        assert webui.XYZ_OVERRIDES not in vars(pc), "the cell's values end with its job"
        return job, text

    return process


def test_axes_are_registered_once_in_both_webuis(plot):
    img2img = [o.label for o in fake_xyz_grid.options_for(plot.grid, True)]
    txt2img = [o.label for o in fake_xyz_grid.options_for(plot.grid, False)]
    ours = [xyz.label(PARAMETERS_BY_NAME[name]) for name in XYZ_AXES]
    assert [label for label in img2img if label.startswith("[Quadtree] ")] == ours
    assert "[Quadtree] Min tile" in txt2img and "[Quadtree] Upscaler" not in txt2img
    assert "[Quadtree] Scale factor" not in txt2img
    for callback in sys.modules["modules.script_callbacks"].before_ui:
        callback()  # before the UI is built (again after a UI reload): nothing added twice
    assert [o.label for o in fake_xyz_grid.options_for(plot.grid, True)] == img2img


@pytest.mark.parametrize("host", ["A1111", "Forge"])
def test_axes_are_added_before_the_ui_when_the_plot_loads_after_the_extension(state, host):
    fake.load_script([])
    grid = fake_xyz_grid.module(forge=host == "Forge")
    sys.modules["modules.scripts"].scripts_data.extend(loaded_scripts(grid, host))
    for callback in sys.modules["modules.script_callbacks"].before_ui:
        callback()
    assert "[Quadtree] Detail threshold" in [o.label for o in grid.axis_options]


def test_issue_axes_are_all_offered():
    wanted = (
        "Detail threshold, Min tile, Max tile, Overlap, Min window, Skip below, Denoise at largest tiles, "
        "Denoise at smallest tiles, Method, Skip mode, Upscaler, Scale factor"
    ).split(", ")
    labels = [PARAMETERS_BY_NAME[name].label for name in XYZ_AXES]
    assert set(wanted) <= set(labels)


@pytest.mark.parametrize("named", [False, True], ids=["positional args", "named API args"])
def test_each_cell_runs_with_its_values_and_its_infotext_records_them(plot, named):
    user = td.Settings(enabled=True, min_tile=64, max_tile=512, skip_below=0)
    args = [{"enabled": True, "min_tile": 64}, *td.Settings().as_args()[1:]] if named else user.as_args()
    p = job_p(plot.script, args)
    cells = fake_xyz_grid.run(
        p,
        run_cell(plot.script, args),
        (axis(plot.grid, "max_tile"), "256, 512"),
        (axis(plot.grid, "skip_below"), "0-200 (+100)"),
    )
    assert len(cells) == 6
    expected = [(m, s) for s in (0, 100, 200) for m in (256, 512)]
    for (job, text), (max_tile, skip_below) in zip(cells, expected):
        assert (job.settings.max_tile, job.settings.skip_below) == (max_tile, skip_below)
        assert job.settings.min_tile == 64 and job.plan.settings == job.settings
        params = infotext.parse(text)
        assert params["Quadtree max tile"] == str(max_tile)
        assert params["Quadtree skip below"] == str(skip_below)
        assert params["Quadtree min tile"] == "64"
    assert webui.XYZ_OVERRIDES not in vars(p), "the job's own p never holds a cell's values"


def test_choice_and_bool_axes_take_the_dropdown_values(plot):
    args = td.Settings(enabled=True).as_args()
    p = job_p(plot.script, args)
    vd, method = axis(plot.grid, "variable_denoise"), axis(plot.grid, "method")
    assert vd.choices() == ["True", "False"] and method.choices() == list(td.settings.METHODS)
    cells = fake_xyz_grid.run(
        p, run_cell(plot.script, args), (vd, "", ["True", "False"]), (method, "", ["MultiDiffusion"])
    )
    assert [job.settings.variable_denoise for job, _ in cells] == [True, False]
    assert {job.settings.method for job, _ in cells} == {"MultiDiffusion"}
    assert infotext.parse(cells[0][1])["Quadtree variable denoise"] == "True"


def test_the_upscale_step_follows_the_cell(plot):
    args = td.Settings(enabled=True, upscaler="Lanczos").as_args()
    p = job_p(plot.script, args)
    factor = axis(plot.grid, "scale_factor")
    upscaler = axis(plot.grid, "upscaler")
    assert upscaler.choices() == ["None", "Lanczos", "Nearest"]
    cells = fake_xyz_grid.run(
        p, run_cell(plot.script, args), (factor, "1.5, 2"), (upscaler, "", ["Lanczos", "None"])
    )
    widths = [job.plan.latent_size[1] * 8 for job, _ in cells]
    assert widths == [768, 1024, 512, 512]  # 512 px wide x 1.5 / x 2; "None": the user's size
    assert (p.width, p.height) == (512, 384)


API_VALUES = [
    ("min_tile", "100", 100),
    ("max_tile", "64", 64),
    ("overlap", "12", 12),
    ("detail_threshold", "0", 0.0),
    ("denoise_smallest", "1.5", 1.5),
    ("scale_factor", "9", 9.0),
    ("method", "Grid", "Grid"),
    ("skip_mode", "Keep nothing", "Keep nothing"),
    ("variable_denoise", "yes", "yes"),
    ("upscaler", "4x-UltraSharp", "4x-UltraSharp"),
]


@pytest.mark.parametrize("name, typed, value", API_VALUES, ids=[v[0] for v in API_VALUES])
def test_a_bad_value_stops_the_plot_with_the_api_message(plot, name, typed, value):
    args = td.Settings(enabled=True).as_args()
    p = job_p(plot.script, args)
    ran = []
    with pytest.raises(td.SettingsError) as error:
        fake_xyz_grid.run(
            p, ran.append, (axis(plot.grid, name), f"{'256, ' if name == 'max_tile' else ''}{typed}")
        )
    assert not ran, "stopped before the first cell"
    body = json.dumps({"alwayson_scripts": {TITLE: {"args": [{"enabled": True, name: value}]}}}).encode()
    assert str(error.value) == payload_error(body, TITLE, webui.upscaler_names)


def test_the_plot_is_refused_when_the_extension_is_off(plot):
    args = td.Settings(enabled=False).as_args()
    p = job_p(plot.script, args)
    ran = []
    with pytest.raises(td.SettingsError, match="tick its Enabled checkbox"):
        fake_xyz_grid.run(p, ran.append, (axis(plot.grid, "min_tile"), "64, 128"))
    assert not ran


def test_a_cell_whose_values_do_not_go_together_fails_naming_them(plot):
    args = td.Settings(enabled=True, max_tile=512).as_args()
    p = job_p(plot.script, args)
    cells = fake_xyz_grid.run(p, run_cell(plot.script, args), (axis(plot.grid, "min_tile"), "128, 384"))
    assert isinstance(cells[0][0], webui.Job)
    rejected = cells[1][0]
    assert isinstance(rejected, webui.RejectedJob)
    assert "max_tile: 512 is not allowed; expected at least twice min_tile (768)" in str(rejected.error)


def test_readme_explains_every_axis():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Compare settings in the X/Y/Z plot") :]
    for name in XYZ_AXES:
        assert f"`{xyz.label(PARAMETERS_BY_NAME[name])}`" in section, name
