"""The coordinator's domain errors and the status codes the API answers them with."""

from __future__ import annotations

from tetherfed_coordinator import errors
from tetherfed_coordinator.edges import ERROR_RESPONSES, status_of


def _kinds(base: type[errors.CoordinatorError]) -> list[type[errors.CoordinatorError]]:
    return [base, *(k for sub in base.__subclasses__() for k in _kinds(sub))]


def test_every_domain_error_has_a_documented_status() -> None:
    for kind in _kinds(errors.CoordinatorError)[1:]:
        exc = kind.__new__(kind)
        assert status_of(exc) in ERROR_RESPONSES, kind


def test_details_and_codes_are_the_ones_clients_see() -> None:
    cases = [
        (errors.FederationNotFound("f"), 404, "federation 'f' not found"),
        (errors.WorkerNotFound("f", "w"), 404, "worker 'w' not found in federation 'f'"),
        (
            errors.NoSnapshot("f", "w"),
            404,
            "worker 'w' in federation 'f' has published no snapshot",
        ),
        (errors.DecisionNotFound("f", 7), 404, "decision 7 not found in federation 'f'"),
        (errors.FederationExists("f"), 409, "federation 'f' already exists"),
        (errors.WorkerLeft("f", "w"), 409, "worker 'w' has left federation 'f'"),
        (errors.BadInput("x"), 400, "x"),
        (errors.TooLarge("x"), 413, "x"),
        (errors.Invalid("x"), 422, "x"),
        (errors.Unavailable("x"), 503, "x"),
    ]
    for exc, code, detail in cases:
        assert (status_of(exc), exc.detail, str(exc)) == (code, detail, detail)
    busy = errors.WorkerBusy("w", "0123456789", 5.0)
    assert status_of(busy) == 409 and "(session 01234567)" in busy.detail
    assert "wait 5 s after it stopped" in busy.detail
