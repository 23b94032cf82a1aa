"""The SSRF guard at submission: a callback URL must reach a public address."""

from __future__ import annotations

import asyncio

from api.responses import JSONResponse
from api.validation import BadRequest
from core.requests import BlogRequest
from core.settings import Settings
from core.ssrf import check_callback_url, needs_lookup


async def check_callback(
    blog: BlogRequest, settings: Settings, *, loc: tuple[str | int, ...] = ("body",)
) -> None:
    """Raise BadRequest (422 naming ``callback_url``) when the URL is refused.

    Checked again at delivery time against the address actually connected to, which
    defeats DNS rebinding; this early check gives the client a clear answer at once.
    """
    if not blog.callback_url:
        return
    allow_http, allowed_hosts = settings.webhook_allow_http, settings.webhook_allowed_hosts
    try:
        # A host name is resolved on a thread; an address or an allow-listed host is
        # decided here, without the hop.
        if needs_lookup(blog.callback_url, allow_http=allow_http, allowed_hosts=allowed_hosts):
            await asyncio.to_thread(
                check_callback_url,
                blog.callback_url,
                allow_http=allow_http,
                allowed_hosts=allowed_hosts,
            )
    except ValueError as exc:
        message = f"Invalid request: callback_url: {exc}"
        error = {"loc": [*loc, "callback_url"], "msg": str(exc), "type": "callback_url_refused"}
        raise BadRequest(
            JSONResponse({"detail": [error], "message": message}, status_code=422), message
        ) from None
