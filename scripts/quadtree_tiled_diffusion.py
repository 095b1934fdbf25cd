"""Quadtree Tiled Diffusion: the WebUI script (A1111 1.10 and Forge). UI and glue only."""

from __future__ import annotations

import os
import sys
import traceback

import gradio as gr
from modules import script_callbacks, scripts

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:  # a broken install must never stop the WebUI from starting
    from tiled_diffusion.hosts import api, webui, words, xyz
    from tiled_diffusion.settings import PARAMETERS
    from tiled_diffusion.ui import build_ui

    IMPORT_ERROR = None
except Exception:  # noqa: BLE001 - any failure is shown in the UI instead
    IMPORT_ERROR = traceback.format_exc()
    print(f"Quadtree Tiled Diffusion could not load:\n{IMPORT_ERROR}", file=sys.stderr)

try:
    from modules.ui_components import InputAccordion
except ImportError:  # WebUIs before 1.7: a plain accordion with a checkbox
    InputAccordion = None

TITLE = "Quadtree Tiled Diffusion"  # = settings.TITLE; spelled here too so a failed import still shows it


class Script(scripts.Script):
    def __init__(self):
        super().__init__()
        self.job = None
        self.preparation = None
        self.sources = {}  # the init image and size controls of this tab, for Preview tiles
        for elem_id in (
            "img2img_image",
            "img2img_width",
            "img2img_height",
            "img2img_prompt",
            "txt2img_width",
            "txt2img_height",
            "txt2img_prompt",
        ):
            self.on_after_component(
                lambda on, elem_id=elem_id: self.sources.update({elem_id: on.component}), elem_id=elem_id
            )

    def after_component(self, component, **kwargs):
        # Forge's img2img image is a ForgeCanvas: "img2img_image" names its HTML block, and the
        # picture lives in the canvas's background Image (the first one made: the img2img tab's).
        classes = kwargs.get("elem_classes") or []
        if "logical_image_background" in classes and "forge_init_image" not in self.sources:
            self.sources["forge_init_image"] = component

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        if IMPORT_ERROR:
            gr.HTML(f"<pre>{TITLE} could not load:\n{IMPORT_ERROR}</pre>")
            return []
        tab = "img2img" if is_img2img else "txt2img"
        notes_pasted = []
        try:
            components = build_ui(
                gr,
                tab=tab,
                accordion=InputAccordion,
                init_image=self.sources.get("forge_init_image", self.sources.get("img2img_image"))
                if is_img2img
                else None,
                width=self.sources.get(f"{tab}_width"),
                height=self.sources.get(f"{tab}_height"),
                upscalers=webui.upscaler_names(),
                prompt=self.sources.get(f"{tab}_prompt"),
                place_words=words.preview,
                notes_pasted=notes_pasted,
            )
        except Exception:  # noqa: BLE001 - with --api, a script's ui() that raises stops the WebUI
            error = traceback.format_exc()
            print(f"{TITLE} could not build its controls:\n{error}", file=sys.stderr)
            gr.HTML(f"<pre>{TITLE} could not build its controls:\n{error}</pre>")
            return []
        # PNG Info, "Send to" and the API's `infotext` field restore every setting. A function
        # reads each value (the WebUI calls it on paste and in the API): given the key, the API
        # would convert the string with the control's type, and bool("False") is True.
        self.infotext_fields = [(c, p.read_infotext) for c, p in zip(components, PARAMETERS)] + notes_pasted
        self.paste_field_names = [p.read_infotext for p in PARAMETERS]  # "Send to" matches these by ==
        return components

    def before_process(self, p, *args):
        if IMPORT_ERROR:
            return
        # Before the WebUI resizes the init images and before any script's process().
        self.preparation = webui.prepare(p, args)

    def process(self, p, *args):
        if IMPORT_ERROR:
            return
        if self.job is not None:  # a previous job that ended in an exception
            self.job.finish()
        self.job = webui.start(p, args, self.preparation)

    def process_before_every_sampling(self, p, *args, **kwargs):
        if self.job is not None:
            self.job.before_sampling(p, kwargs["x"])

    def postprocess_image(self, p, pp, *args):
        if self.job is not None:
            self.job.postprocess_image(p, pp)

    def postprocess(self, p, processed, *args):
        if not IMPORT_ERROR:
            webui.forget_overrides(p)  # an X/Y/Z plot cell's values end with its job
        if self.preparation is not None:
            self.preparation.undo()  # e.g. the user's width, height and init images for the next job
            self.preparation = None
        if self.job is not None:
            self.job.finish()
            self.job = None


def add_xyz_axes():
    """Our axes in the X/Y/Z plot (the WebUI's own scripts/ load before extensions; the
    callback catches a plot script loaded later). Never stops the WebUI."""
    try:
        xyz.register(scripts.scripts_data, webui.upscaler_names)
    except Exception:  # noqa: BLE001 - the extension works without its axes
        print(f"{TITLE} could not add its X/Y/Z plot axes:\n{traceback.format_exc()}", file=sys.stderr)


if not IMPORT_ERROR:
    script_callbacks.on_app_started(lambda demo, app: api.add_validator(app, TITLE, webui.upscaler_names))
    add_xyz_axes()
    script_callbacks.on_before_ui(add_xyz_axes)
