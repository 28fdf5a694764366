"""The REST SDK: :class:`Client` and :class:`AsyncClient` for every route of the coordinator, the
error tree they raise, and their retry policy. Needs httpx and `tether_protocol` only (no torch).
"""

from ._errors import (
    APIError,
    AuthError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    RefusedError,
    ServerError,
    TetherError,
    TransportError,
)
from ._retry import RetryPolicy
from ._sdk import AsyncClient, Client

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "NotFoundError",
    "RefusedError",
    "RetryPolicy",
    "ServerError",
    "TetherError",
    "TransportError",
]
