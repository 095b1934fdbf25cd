"""Rejects bad `alwayson_scripts` arguments before the WebUI's API handler runs.

The WebUI passes script args through unchecked and swallows exceptions raised in a
script's `process()`, running the job untiled with HTTP 200. This ASGI middleware
answers 422 naming the bad argument instead; the request never reaches the handler.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..settings import PARAMETERS_BY_NAME, Settings, SettingsError, brief_repr

GENERATION_PATHS = ("/sdapi/v1/img2img", "/sdapi/v1/txt2img")


def payload_error(body: bytes, title: str, upscalers: Callable[[], list[str]] | None = None) -> str | None:
    """What is wrong with this request's args for the script `title`, or None.

    upscalers: gives the names of the WebUI's upscalers (they can change while it runs)."""
    try:
        payload = json.loads(body or b"null")
    except ValueError:
        return None  # not JSON: the WebUI's own validation answers
    if not isinstance(payload, dict):
        return None
    scripts = payload.get("alwayson_scripts")
    settings = None
    for name, entry in (scripts if isinstance(scripts, dict) else {}).items():
        if name.lower() != title.lower():
            continue
        if not isinstance(entry, dict) or "args" not in entry:
            return f'{title}: expected {{"args": [...]}}, got {brief_repr(entry)}'
        try:
            settings = Settings.from_args(entry["args"]).check_upscaler(upscalers() if upscalers else None)
        except SettingsError as error:
            return f"{title}: {error}"
    return missing_map(payload.get("infotext"), settings, title)


def missing_map(infotext: Any, settings: Settings | None, title: str) -> str | None:
    """A re-run from an infotext whose job used a strength map, without the map: the
    infotext holds only the map's digest, so the job cannot be repeated without it."""
    key = PARAMETERS_BY_NAME["strength_map"].infotext_key
    if not isinstance(infotext, str) or f"{key}: " not in infotext:
        return None
    if settings is not None and settings.strength_map is not None:
        return None
    used = infotext.split(f"{key}: ", 1)[1].split(",")[0].strip()
    return (
        f"{title}: strength_map: the infotext's job used the strength map {used}, and an infotext "
        "holds only its digest; send the same picture as base64 PNG in the named argument strength_map "
        f'(alwayson_scripts: {{"{title.lower()}": {{"args": [{{"enabled": true, "strength_map": "..."}}]}}}})'
    )


class ArgsValidator:
    """ASGI middleware: 422 for a generation request whose args for `title` are invalid."""

    def __init__(self, app: Any, title: str, upscalers: Callable[[], list[str]] | None = None):
        self.app, self.title, self.upscalers = app, title, upscalers

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)  # the client went away: let the app see it
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        error = payload_error(body, self.title, self.upscalers)
        if error is not None:
            # The shape of the WebUI's own API errors; for an HTTPException it sends the message
            # in "detail" only ("body" and "errors" are empty), and so does this.
            content = json.dumps(
                {"error": "SettingsError", "detail": error, "body": "", "errors": ""}
            ).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(content)).encode()),
            ]
            await send({"type": "http.response.start", "status": 422, "headers": headers})
            await send({"type": "http.response.body", "body": content})
            return
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def add_validator(app: Any, title: str, upscalers: Callable[[], list[str]] | None = None) -> None:
    """Put the validator in front of a FastAPI/Starlette app, even one already serving.

    Starlette builds its middleware stack once; clearing it makes the next request build
    it again with this middleware (the WebUI resets it the same way for its own).
    """
    app.middleware_stack = None
    app.add_middleware(ArgsValidator, title=title, upscalers=upscalers)
