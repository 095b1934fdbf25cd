"""The WebUI's infotext round trip, rewritten from its source for the tests.

A job's `p.extra_generation_params` go into the infotext; pasting that in the UI, or sending
it in an API request's `infotext` field, sets the script's controls or args back. A1111
1.10.1 (modules/..., commit 82a973c0) and Forge 2.x [dfdcbab6] have the same code here:

- write: processing.py:812 [792] create_infotext
- parse: infotext_utils.py:234 [251] parse_generation_parameters
- API: api/api.py:363 [365] apply_infotext (script fields :418-428 [431-441]), then
  :335 [337] init_script_args
- UI paste: infotext_utils.py:476 [573] connect_paste
- Send to: infotext_utils.py:168-175 [179-186] connect_paste_params_buttons
"""

from __future__ import annotations

import json
import re
import types

# A `key: value` pair of the parameters line, as infotext_utils.re_param_code reads it.
PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE = re.compile(r"^(\d+)x(\d+)$")
SENT_BY_THE_WEBUI = ["Prompt", "Negative prompt", "Steps", "Face restoration"]  # + the scripts' names


class Component:
    """A gradio block as build_ui and the WebUI's paste code use it: a value, a context, events."""

    def __init__(self, *args, value=None, **kwargs):
        self.value = value

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def click(self, *args, **kwargs):
        pass


gradio = types.ModuleType("gradio")
CONTROLS = (
    "Accordion",
    "Group",
    "Row",
    "Checkbox",
    "Radio",
    "Dropdown",
    "Slider",
    "Textbox",
    "Markdown",
    "Button",
    "Image",
)
for _name in CONTROLS:
    setattr(gradio, _name, Component)


def write(prompt: str, negative_prompt: str, params: dict) -> str:
    """The infotext of one image: `key: value` pairs joined by ", ", a value holding a comma,
    colon or newline JSON-quoted (infotext_utils.quote), None left out."""

    def quote(value):
        text = str(value)
        return json.dumps(value, ensure_ascii=False) if any(c in text for c in ",:\n") else text

    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    return f"{prompt}\nNegative prompt: {negative_prompt}\n{line}"


def parse(infotext: str) -> dict:
    """The last line's pairs (when it has three or more), every value a string."""
    *_, last = infotext.strip().split("\n")
    pairs = PAIR.findall(last)
    params = {}
    for key, value in pairs if len(pairs) >= 3 else []:
        if not value:
            continue  # the WebUI fails on value[0] and leaves the key out
        if value[0] == '"' and value[-1] == '"':
            value = json.loads(value)
        size = SIZE.match(value)
        if size:
            params[f"{key}-1"], params[f"{key}-2"] = size.groups()
        else:
            params[key] = value
    return params


def read(target, params: dict):
    """A paste field's value: its function's answer, or the value of its key."""
    return target(params) if callable(target) else params.get(target)


def api_script_args(infotext: str, fields: list, inputs: list) -> list:
    """The script args of an API request with this `infotext` and no alwayson_scripts.

    inputs: the script runner's controls, inputs[0] standing for the script dropdown. Every
    control starts at its UI value; a field whose control is among them puts the value it
    reads, converted by type(control.value) unless it already is one, at that control's
    position. (A request's own alwayson args would then overwrite their positions.)
    """
    params = parse(infotext)
    args = [0] + [control.value for control in inputs[1:]]
    position = {control: i for i, control in enumerate(inputs)}
    for control, target in fields:
        if control not in position:
            continue
        value = read(target, params)
        kind = type(control.value)
        if isinstance(value, dict) and value.get("__type__") == "generic_update":
            value = value.get("value")  # a gr.update(): its value
        if value is None or kind is type(None):
            continue
        args[position[control]] = value if isinstance(value, kind) else kind(value)
    return args


def paste(infotext: str, fields: list) -> dict:
    """{control: new value} of pasting this infotext in the UI; None leaves a control as it is,
    and so does a value its control's type cannot take."""
    params = parse(infotext)
    values = {}
    for control, target in fields:
        value = read(target, params)
        if value is None:
            continue
        kind = type(control.value)
        try:
            if kind is bool and value == "False":
                values[control] = False
            else:
                values[control] = float(value) if kind is int else kind(value)
        except Exception:  # noqa: BLE001 - the WebUI leaves the control on any failure
            continue
    return values


def send_to(source_fields: list, target_fields: list, script_names: list) -> list:
    """(source, target) control pairs that "Send to" copies: the fields whose name is among
    the WebUI's and the scripts' paste field names, by == and in order on both tabs."""
    names = SENT_BY_THE_WEBUI + script_names
    sources = [control for control, name in source_fields if name in names]
    targets = [control for control, name in target_fields if name in names]
    assert len(sources) == len(targets), "gradio would refuse outputs that do not match inputs"
    return list(zip(sources, targets))
