"""The API guard: bad alwayson_scripts args get a 422 naming the argument, before the WebUI runs."""

from __future__ import annotations

import asyncio
import json

import pytest
from PIL import Image

import tiled_diffusion as td
from tiled_diffusion.hosts.api import ArgsValidator, add_validator, payload_error

from .images import png_base64

TITLE = "Quadtree Tiled Diffusion"
MB = 1 << 20
CUT = repr("a" * 40 + "…")  # how an error quotes a megabyte of "a"


class Downstream:
    """The WebUI's API app: records what reached it and answers 200."""

    def __init__(self):
        self.bodies = []

    async def __call__(self, scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def post(app, path, payload, chunk=7):
    """Send one POST through an ASGI app in small body chunks; return (status, body)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    incoming = [
        {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)
    ]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def request(args, name=TITLE):
    return {"prompt": "a cat", "alwayson_scripts": {name: {"args": args}}}


@pytest.mark.parametrize(
    "args, named",
    [
        (["false"], "enabled"),
        ([True, "MultiDiffusion", "sixty-four"], "detail_threshold"),
        ([True, "Mixture"], "method"),
        ([True, "MultiDiffusion", 90, 100], "min_tile"),
        ([True, "MultiDiffusion", 90, 128, 256, 64, 0], "tile_batch"),
        ([{"enabled": True, "skip_bellow": 64}], "skip_bellow"),
        ([{"enabled": True, "max_tile": 128}], "max_tile"),
        ([{"enabled": True, "regions": "0 0 1 1: a barn\n0 0 2 1: a field"}], "regions: line 2"),
        ([{"enabled": True, "regions": ["0 0 1 1: a barn"]}], "regions"),
        ([{"enabled": True, "window_prompts": "Words"}], "window_prompts"),
        (
            [{"enabled": True, "strength_map": "not a picture"}],
            "strength_map: 'not a picture' is not an image",
        ),
        ([{"enabled": True, "strength_map": "data:image/png;base64,"}], "strength_map"),
        ([True] * (len(td.PARAMETERS) + 1), f"{len(td.PARAMETERS) + 1} values given"),
        ("true", "args: expected a list"),
        ({"enabled": True}, "args: expected a list"),
    ],
)
def test_bad_api_argument_is_rejected_with_422_naming_it(args, named):
    downstream = Downstream()
    app = ArgsValidator(downstream, TITLE)
    status, body = post(app, "/sdapi/v1/img2img", request(args, name="quadtree tiled diffusion"))
    assert status == 422
    detail = json.loads(body)["detail"]
    assert detail.startswith(TITLE) and named in detail
    assert downstream.bodies == [], "the WebUI never ran the job"


def test_good_requests_reach_the_webui_unchanged():
    downstream = Downstream()
    app = ArgsValidator(downstream, TITLE)
    good = [
        request([True, "MultiDiffusion", 60, 128, 512, 64, 4, 128, "Keep latent", True, 0.2, 0.6]),
        request([{"enabled": True, "skip_below": 256}]),
        request([False]),
        {"prompt": "no scripts at all"},
        {"alwayson_scripts": {"Other Script": {"args": ["anything", 12]}}},
    ]
    for payload in good:
        status, _ = post(app, "/sdapi/v1/txt2img", payload)
        assert status == 200
    assert [json.loads(b) for b in downstream.bodies] == good


def test_next_request_after_a_rejection_is_served():
    downstream = Downstream()
    app = ArgsValidator(downstream, TITLE)
    assert post(app, "/sdapi/v1/img2img", request(["false"]))[0] == 422
    assert post(app, "/sdapi/v1/img2img", request([True]))[0] == 200
    assert len(downstream.bodies) == 1


def test_other_routes_and_non_json_bodies_pass_through():
    downstream = Downstream()
    app = ArgsValidator(downstream, TITLE)
    assert post(app, "/sdapi/v1/options", request(["false"]))[0] == 200
    assert post(app, "/sdapi/v1/img2img", b"not json")[0] == 200
    assert payload_error(b"[1, 2]", TITLE) is None


def test_entry_without_args_list_is_rejected():
    message = payload_error(json.dumps({"alwayson_scripts": {TITLE: [True]}}).encode(), TITLE)
    assert message and "expected" in message
    message = payload_error(json.dumps({"alwayson_scripts": {TITLE: "a" * MB}}).encode(), TITLE)
    assert message.endswith(f"got {CUT} ({MB} characters)")


@pytest.mark.parametrize(
    "args, named",
    [
        (
            [{"enabled": True, "method": "a" * MB}],
            f"method: {CUT} ({MB} characters) is not allowed",
        ),
        ([True, "a" * MB], f"method: {CUT} ({MB} characters) is not allowed"),
        ([{"enabled": True, "a" * MB: True}], f"{CUT} ({MB} characters): unknown argument"),
        ([True, ["a"] * MB], f"method: {repr(['a'] * MB)[:40]}… ({5 * MB} characters)"),
    ],
    ids=["named value", "positional value", "name", "list value"],
)
def test_huge_value_or_name_gets_a_short_422_naming_the_argument(args, named):
    app = ArgsValidator(Downstream(), TITLE)
    status, body = post(app, "/sdapi/v1/img2img", request(args), chunk=1 << 16)
    assert status == 422 and len(body) < 2048, len(body)
    assert named in json.loads(body)["detail"]


def test_rejection_has_the_webui_error_shape_with_the_message_once():
    # A1111 and Forge answer an HTTPException with these four keys; "body" and "errors" are
    # empty there (modules/api/api.py handle_exception), the message is in "detail" only.
    status, body = post(ArgsValidator(Downstream(), TITLE), "/sdapi/v1/txt2img", request(["false"]))
    answer = json.loads(body)
    assert status == 422
    assert answer == {"error": "SettingsError", "detail": answer["detail"], "body": "", "errors": ""}
    assert answer["detail"] == f"{TITLE}: enabled: 'false' is not allowed; expected true or false"


def test_validator_can_be_added_to_an_app_that_already_serves():
    class App:
        def __init__(self):
            self.middleware_stack = object()  # built: a running Starlette app
            self.added = []

        def add_middleware(self, cls, **options):
            assert self.middleware_stack is None, "Starlette refuses once its stack is built"
            self.added.append((cls, options))

    app = App()
    add_validator(app, TITLE)
    assert app.added == [(ArgsValidator, {"title": TITLE, "upscalers": None})]


def test_default_args_list_is_valid():
    assert payload_error(json.dumps(request(td.Settings().as_args())).encode(), TITLE) is None


def test_an_infotext_rerun_of_a_job_with_a_strength_map_needs_the_map_again():
    picture = Image.linear_gradient("L").resize((32, 32))
    used = td.Settings(enabled=True, strength_map=picture)
    infotext = "a cat\nSteps: 20, " + ", ".join(f"{k}: {v}" for k, v in used.infotext().items())
    app = ArgsValidator(Downstream(), TITLE)
    status, body = post(app, "/sdapi/v1/img2img", {"prompt": "", "infotext": infotext})
    assert status == 422
    detail = json.loads(body)["detail"]
    assert (
        f"strength_map: the infotext's job used the strength map {used.strength_map.digest} (32x32 px)"
        in detail
    )
    again = {"infotext": infotext, **request([{"enabled": True, "strength_map": png_base64(picture)}])}
    assert post(app, "/sdapi/v1/img2img", again)[0] == 200
    plain = "a cat\nSteps: 20, " + ", ".join(
        f"{k}: {v}" for k, v in td.Settings(enabled=True).infotext().items()
    )
    assert post(app, "/sdapi/v1/img2img", {"infotext": plain})[0] == 200
