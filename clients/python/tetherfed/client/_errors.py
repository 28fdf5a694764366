"""The SDK's error tree.

TetherError
├── RefusedError          the coordinator refused a worker for good (raised by Federation.step)
├── TransportError        the coordinator could not be reached or did not answer in time
└── APIError              it answered with an error status; carries `status` and `detail`
    ├── BadRequestError   400, 413, 422: the request was wrong (the detail says how)
    ├── AuthError         401, 403: missing or wrong token
    ├── NotFoundError     404: unknown federation, worker, layer or decision; 410: no longer stored
    ├── ConflictError     409: the request conflicts with existing state
    └── ServerError       5xx: the coordinator failed; retried for idempotent calls
"""

from __future__ import annotations

from typing import Any


class TetherError(Exception):
    """Base of every error the tetherfed SDK raises."""


class RefusedError(TetherError):
    """The coordinator refused a worker for good: unknown federation, token refused, or an
    invalid layer table. Training with that federation cannot go on; the message says why."""


class TransportError(TetherError):
    """The coordinator could not be reached, or the connection failed or timed out."""


class APIError(TetherError):
    """The coordinator answered with an error status."""

    def __init__(self, status: int, detail: Any, method: str = "", url: str = "") -> None:
        self.status = status
        self.detail = detail
        self.method = method
        self.url = url
        super().__init__(f"{method} {url} -> {status}: {detail}".strip())


class BadRequestError(APIError):
    """400, 413 or 422: the request was malformed or failed validation."""


class AuthError(APIError):
    """401 or 403: the token is missing, wrong, or belongs to another worker."""


class NotFoundError(APIError):
    """404: the federation, worker, layer or decision does not exist; 410: it existed and is no
    longer stored (a partner snapshot version superseded and no longer pinned)."""


class ConflictError(APIError):
    """409: the request conflicts with existing state (e.g. a federation name in use)."""


class ServerError(APIError):
    """5xx: the coordinator failed while handling the request."""


def error_for(status: int, detail: Any, method: str = "", url: str = "") -> APIError:
    """The APIError subclass for an HTTP status."""
    kind: type[APIError]
    if status in (401, 403):
        kind = AuthError
    elif status in (404, 410):
        kind = NotFoundError
    elif status == 409:
        kind = ConflictError
    elif status >= 500:
        kind = ServerError
    elif status >= 400:
        kind = BadRequestError
    else:
        kind = APIError
    return kind(status, detail, method, url)
