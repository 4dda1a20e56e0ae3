"""`serve --api-key`: every /v1 route needs `Authorization: Bearer KEY`.

An ASGI middleware, outside the body limits, so a request without the key is refused before
its body is read. The answer is OpenAI's: a 401 with code `invalid_api_key` (the official
clients raise AuthenticationError). The key is compared in constant time (hmac.compare_digest
on bytes), so the time of a refusal does not tell how much of a guess was right. The chat page
(/), its static files, /health and /metrics stay open: a load balancer and Prometheus probe
them, and the page asks for the key itself.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from llamaworks.serve.limits import send_error
from llamaworks.serve.protocol import APIError

PROTECTED_PREFIX = "/v1"


def check_api_key(key: str) -> str:
    """The key as given to --api-key / LLAMAWORKS_API_KEY, checked: header-safe text."""
    if not isinstance(key, str) or not key or key != key.strip() or not key.isprintable() or not key.isascii():
        raise ValueError("the API key (--api-key or LLAMAWORKS_API_KEY) must be non-empty printable ASCII without "
                         "leading or trailing spaces, as it is sent in an Authorization header")
    return key


def bearer_ok(header: bytes | None, key: bytes) -> bool:
    """Whether an Authorization header value carries `key` as a bearer token."""
    if header is None:
        return False
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(token.strip(), key)


class APIKeyAuth:
    """ASGI middleware: refuses /v1 requests without the bearer key with a 401."""

    def __init__(self, app, key: str, on_reject: Callable[[str, int], None] | None = None):
        self.app, self.key, self.on_reject = app, check_api_key(key).encode("ascii"), on_reject

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/"):
            header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            if not bearer_ok(header, self.key):
                if self.on_reject is not None:
                    self.on_reject(path, 401)
                what = "no API key was sent" if header is None else "the API key sent is not this server's"
                return await send_error(send, APIError(
                    401, f"{what}: send the server's key (llamaworks serve --api-key) as 'Authorization: Bearer KEY'",
                    type="invalid_request_error", code="invalid_api_key"))
        return await self.app(scope, receive, send)
