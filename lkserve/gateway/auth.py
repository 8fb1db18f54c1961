"""API keys (`Authorization: Bearer <key>`), as FastAPI dependencies.

- `/v1/*`: any key in `GatewaySettings.api_keys`; none configured = open (a warning is logged at startup).
- `/admin/*`: only `GatewaySettings.admin_key` (API keys are not admin keys, and the admin key is not an API key
  unless also listed in api_keys). No admin key configured: open when no API keys are configured either (a local
  setup, warned about), otherwise the admin API is refused (403): an API key must never be able to swap drafts.
- `/health`, `/ready`, `/metrics`: open.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import Request

from lkserve.gateway.errors import AUTHENTICATION, PERMISSION, APIError

log = logging.getLogger("lkserve.gateway")

_WWW_AUTH = {"WWW-Authenticate": "Bearer"}


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    # Some OpenAI-style tools send the key in `api-key` (Azure style); accept it too.
    return request.headers.get("api-key") or None


def _matches(token: str, keys: list[str]) -> bool:
    ok = False
    for key in keys:  # no early exit: constant time in the position of the matching key
        ok |= hmac.compare_digest(token.encode(), key.encode())
    return ok


def _redact(token: str) -> str:
    return token[:3] + "*" * 4 + token[-4:] if len(token) > 10 else "****"


class Auth:
    def __init__(self, api_keys: list[str], admin_key: str | None):
        self.api_keys = [k for k in api_keys if k]
        self.admin_key = admin_key or None

    def log_warnings(self) -> None:
        if not self.api_keys:
            log.warning("no API keys configured (gateway.api_keys): /v1 is open to anyone who can reach it")
        if self.admin_key is None:
            if self.api_keys:
                log.warning("no admin key configured (gateway.admin_key): the /admin API is disabled")
            else:
                log.warning("no admin key configured (gateway.admin_key): the /admin API is open")

    async def require_api_key(self, request: Request) -> None:
        if not self.api_keys:
            return
        token = _bearer(request)
        if token is None:
            raise APIError(
                401,
                "You didn't provide an API key. Send it in the Authorization header: 'Authorization: Bearer KEY'.",
                type=AUTHENTICATION,
                code="missing_api_key",
                headers=_WWW_AUTH,
            )
        if not _matches(token, self.api_keys):
            raise APIError(
                401,
                f"Incorrect API key provided: {_redact(token)}.",
                type=AUTHENTICATION,
                code="invalid_api_key",
                headers=_WWW_AUTH,
            )

    async def require_admin_key(self, request: Request) -> None:
        if self.admin_key is None:
            if not self.api_keys:
                return
            raise APIError(
                403, "The admin API is disabled: no admin key is configured.", type=PERMISSION, code="admin_disabled"
            )
        token = _bearer(request)
        if token is None:
            raise APIError(
                401, "The admin API needs the admin key: 'Authorization: Bearer ADMIN_KEY'.",
                type=AUTHENTICATION, code="missing_api_key", headers=_WWW_AUTH,
            )
        if not _matches(token, [self.admin_key]):
            raise APIError(
                401, f"Incorrect admin key provided: {_redact(token)}.",
                type=AUTHENTICATION, code="invalid_api_key", headers=_WWW_AUTH,
            )
