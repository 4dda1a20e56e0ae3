"""What one connection may cost the server before its request reaches a handler.

- Headers: uvicorn's h11 parser refuses a header block over 16 KiB (a 400); `header_timeout`
  closes a connection whose request line and headers have not all arrived in time (uvicorn
  itself waits forever for them; its keep-alive timeout only runs between requests).
- Body: at most `max_body_bytes`, whether announced by Content-Length (refused before a
  byte is read) or streamed in chunks (refused as soon as the count passes it), and all of
  it within `body_timeout` of the headers; a 413 or 408 in OpenAI's error shape, then the
  connection closes. A client that disconnects mid-body gets no answer and logs nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass

from llamaworks.serve.protocol import APIError


@dataclass(frozen=True)
class Limits:
    # Room for any prompt the context window can take: 2,048 tokens of LLaMA text are at most
    # ~32k characters (16 per token), ~400 KB of JSON even with every character \u-escaped.
    max_body_bytes: int = 4 * 1024 * 1024
    header_timeout: float = 10.0  # seconds from connecting (or a request's first byte) to its last header
    body_timeout: float = 30.0  # seconds from the last header to the body's last byte

    def __post_init__(self):
        if not (isinstance(self.max_body_bytes, int) and self.max_body_bytes >= 1):
            raise ValueError(f"max_body_bytes (--max-body-bytes) must be a positive number of bytes, "
                             f"got {self.max_body_bytes!r}")
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{name} ({flag}) must be a positive number of seconds, got {value!r}")


async def send_error(send, e: APIError) -> None:
    """Answer with `e` and close the connection: the rest of the request (an unread body)
    is never read."""
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: reads each HTTP request's whole body within the limits, then hands
    the application a receive() that returns it in one message, and after it the server's
    own receive() (which reports the client's disconnect)."""

    def __init__(self, app, limits: Limits, on_reject: Callable[[str, int], None] | None = None):
        self.app, self.limits, self.on_reject = app, limits, on_reject

    async def _reject(self, scope, send, e: APIError) -> None:
        if self.on_reject is not None:
            self.on_reject(scope.get("path", ""), e.status)
        await send_error(send, e)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.max_body_bytes
        too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes "
                                  "(llamaworks serve --max-body-bytes)", code="request_too_large")
        for name, value in scope["headers"]:
            # h11 has checked that a Content-Length is made of digits; more than 18 of them
            # (past leading zeros) announce a body over any limit, and int() would refuse 4300.
            if name == b"content-length":
                digits = value.lstrip(b"0")
                if len(digits) > 18 or int(digits or b"0") > limit:
                    return await self._reject(scope, send, too_large)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                return await self._reject(scope, send, APIError(
                    408, f"the request body did not arrive within {self.limits.body_timeout} s "
                         "(llamaworks serve --body-timeout)", code="request_timeout"))
            if message["type"] == "http.disconnect":
                return  # the client left before its request was whole: there is no one to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._reject(scope, send, too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        chunks.clear()
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection whose request line and headers take
    longer than `seconds`: counted from the connection's start, and on a kept-alive
    connection from the next request's first byte (idle time between requests is
    uvicorn's keep-alive timeout)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first byte of the next request on a kept-alive connection
            super().data_received(data)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are all in
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
