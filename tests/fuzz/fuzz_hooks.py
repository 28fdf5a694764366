"""schemathesis hooks of `run_api_fuzz.py` (loaded through SCHEMATHESIS_HOOKS): what the positive
and negative data checks must know that the OpenAPI document cannot state.

A few rules compare one field with another or one list item with the next, which JSON Schema
cannot express for these bodies; the document states them in the field descriptions and the
server refuses a body that breaks one with a 422 naming the rule. A schema-valid body refused
for such a rule, with that rule's words, is expected (`KNOWN_RULES`); any other refusal of a
schema-valid body still fails the run, and so does any 422 whose detail carries a message that
is not one of these.

Every entry cites where the rule is stated.
"""

from __future__ import annotations

import re
from typing import Any

import schemathesis

# (operation "METHOD path" pattern, detail message pattern)
KNOWN_RULES: list[tuple[re.Pattern[str], re.Pattern[str]]] = [
    # WorkerCreate.layers (tether_protocol/messages.py): each layer name appears once.
    (
        re.compile(r"^POST /v1/federations/\{fed\}/workers$"),
        re.compile(r"layer .* appears twice in the layer table"),
    ),
    # Policy's model validator (tether_protocol/messages.py, `Policy._thresholds_ordered` and
    # the rules it calls; docs/explanation/policy.md): thresholds ordered, inside the measure's
    # range, outside a sketch's noise band; min_merge_score only with a relative rule.
    (
        re.compile(r"^(POST /v1/federations|PATCH /v1/federations/\{fed\}/policy)$"),
        re.compile(
            r"drift_threshold \(.*\) must be ≤ merge_threshold"
            r"|(merge|drift)_threshold .* is outside \[.*\], the range of "
            r"|(merge|drift)_threshold .* is inside the sketch noise band"
            r"|min_merge_score applies only with a relative rule"
        ),
    ),
]


# Integer bounds above 2**53 (a 63-bit seed or id) are compared as floats while data is
# generated: a "valid" value a few units over the bound is then sent. Such a request was never
# schema-valid, and its refusal is right.
EXACT_INTS = 2**53
BOUNDS = {
    "less_than": lambda value, bound: value >= bound,
    "less_than_equal": lambda value, bound: value > bound,
    "greater_than": lambda value, bound: value <= bound,
    "greater_than_equal": lambda value, bound: value < bound,
}


def over_an_inexact_bound(body: Any) -> bool:
    """Whether every error of a 422 is an integer outside a bound beyond 2**53 in magnitude."""
    errors = _errors(body)
    if not errors:
        return False
    for error in errors:
        kind, value = error.get("type"), error.get("input")
        ctx = error.get("ctx") or {}
        bound = next((v for k, v in ctx.items() if k in ("lt", "le", "gt", "ge")), None)
        broken = BOUNDS.get(kind)
        if broken is None or not isinstance(value, int) or not isinstance(bound, int):
            return False
        if abs(bound) < EXACT_INTS or not broken(value, bound):
            return False
    return True


def _errors(body: Any) -> list[dict[str, Any]] | None:
    """The errors of a 422 body (FastAPI's list), without those of a union's other branch: a
    policy is a Policy object or a preset name, and an object that breaks a Policy rule also
    gets "Input should be 'default', …" for the name branch."""
    detail = body.get("detail") if isinstance(body, dict) else None
    if not isinstance(detail, list) or not all(isinstance(e, dict) for e in detail):
        return None

    def other_branch(error: dict[str, Any]) -> bool:
        loc = [str(part) for part in error.get("loc") or []]
        return error.get("type") == "literal_error" and any(p.startswith("literal[") for p in loc)

    kept = [e for e in detail if not other_branch(e)]
    return kept or detail


def _messages(body: Any) -> list[str] | None:
    """The messages of a 422 body (its errors', or its one detail string)."""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return [detail]
    errors = _errors(body)
    return None if errors is None else [str(e.get("msg", "")) for e in errors]


def known_refusal(operation: str, status: int, body: Any) -> bool:
    """Whether a refusal of a schema-valid request is one of `KNOWN_RULES`: a 422 whose every
    message is a rule the operation states."""
    messages = _messages(body) if status == 422 else None
    if not messages:
        return False
    rules = [rule for op, rule in KNOWN_RULES if op.search(operation)]
    return all(any(rule.search(m) for rule in rules) for m in messages)


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but a schema-valid request refused for a rule the document states in
    words or for breaking a bound the generator compared inexactly (ST202,
    positive_data_acceptance),."""
    code = getattr(failure, "code", None)
    if code != "ST202":
        return True
    operation = f"{case.operation.method.upper()} {case.operation.path}"
    try:
        body = response.json()
    except ValueError:
        return True
    known = known_refusal(operation, response.status_code, body)
    return not (known or (response.status_code == 422 and over_an_inexact_bound(body)))
