"""Results of an experiment: one row per run (`results.csv`) and per cell and arm (`summary.csv`).

A row is built by a list of column providers, each a function of the run's folder that returns
some columns (`COLUMNS`); adding columns (diagnostics, science) means adding a provider.

Evaluation metrics (`eval_metrics`): `val_loss`, `val_<name>` for each metric the task declares
(e.g. `val_acc`; a task metric is a score, higher is better), each averaged over the run's
workers, and the run's worst worker on each: `worst_val_loss` the highest final validation loss
among its workers, `worst_val_<name>` the lowest final value. The summary pairs each of them
against a reference arm (`<metric>_diff_*`) and, when the cell has an `oracle` arm, reports the
fraction of the oracle's gain an arm recovers (`<metric>_oracle_recovered`).
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What building a results row imports on first use (optional: the worker extra brings them).
LAZY_MODULES = ("networkx", "sklearn.metrics", "scipy.stats", "tetherfed.diagnostics")


def preload() -> None:
    """Import what writing results imports lazily, before a sweep starts.

    An interrupt (Ctrl-C, or SIGTERM turned into one) that lands in the middle of an import
    leaves a half-initialised module in `sys.modules`. An interrupted sweep writes its results
    once more on the way out, and importing such a module again raises (networkx: "Algorithm
    already exists in dispatch namespace"): the interrupt, exit 130, became a crash, exit 1.
    A sweep first writes results right after its first run ends, when a user is most likely to
    stop it."""
    for name in LAZY_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


METRICS = (
    "val_loss",
    "train_loss",
    "merges",
    "drifts",
    "rejected",
    "ari",
    "ari_kept",
    "merges_within",
    "merges_across",
    "kept_within",
    "kept_across",
    "merges_unacked",
    "gate_checked",
    "gate_rolled_back",
    "gate_max_kept_rise",
    "steps_per_s",
    "publishes",
    "publishes_skipped",
    "merges_per_100_steps",
    "wall_s",
)
PACE = ("publishes", "publishes_skipped", "merges_per_100_steps")  # a worker's done line
CONTROL = "independent"  # the default reference arm
ORACLE = "oracle"


@dataclass(frozen=True)
class RunRecord:
    """What a provider may read: the run's identity and its folder."""

    run_id: str
    cell: int
    arm: str
    repeat: int
    params: Mapping[str, Any]
    folder: Path

    def json(self, name: str) -> Any:
        """A JSON file of the run folder (None when missing or unreadable)."""
        try:
            return json.loads((self.folder / name).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def jsonl(self, name: str) -> list[dict[str, Any]]:
        """The records of a JSON-lines file of the run folder ([] when missing; bad lines
        skipped)."""
        try:
            lines = (self.folder / name).read_text().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def final_events(self) -> list[dict[str, Any]]:
        """Per worker, its last `step` event merged with its `done` event (metrics.jsonl): the
        done event's validation figures and pace (`PACE`) win."""
        config = self.json("config.json") or {"workers": []}
        return [_last_events(self.folder / w["name"] / "metrics.jsonl") for w in config["workers"]]


ColumnProvider = Callable[[RunRecord], dict[str, Any]]


def _last_events(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "step":
            out.update(event)
        elif event.get("event") == "done":
            out.update({k: v for k, v in event.items() if k.startswith("val_") or k in PACE})
            out["val_loss"] = event.get("val_loss", out.get("val_loss"))
    return out


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(kept) if kept else None


def identity_columns(run: RunRecord) -> dict[str, Any]:
    """run_id, cell, arm, repeat, state, and the cell's parameters (flattened dotted keys)."""
    status = run.json("status.json") or {}
    return {
        "run_id": run.run_id,
        "cell": run.cell,
        "arm": run.arm,
        "repeat": run.repeat,
        "state": status.get("state", "pending"),
        **dict(run.params),
    }


def _finite(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def loss_columns(run: RunRecord) -> dict[str, Any]:
    """Final train and validation loss and each task metric (`val_<name>`), averaged over the
    workers; steps/s likewise. The worst worker: `worst_val_loss`, the highest final validation
    loss of the run's workers, and `worst_val_<name>`, the lowest final task metric (empty when
    no worker reported it)."""
    events = run.final_events()
    task_metrics = sorted({k for e in events for k in e if k.startswith("val_")} - {"val_loss"})
    columns: dict[str, Any] = {
        "train_loss": _mean(e.get("loss") for e in events),
        "val_loss": _mean(e.get("val_loss") for e in events),
    }
    columns |= {m: _mean(e.get(m) for e in events) for m in task_metrics}
    columns["steps_per_s"] = _mean(e.get("steps_per_s") for e in events)
    losses = _finite(e.get("val_loss") for e in events)
    columns["worst_val_loss"] = max(losses, default=None)
    for m in task_metrics:
        columns[f"worst_{m}"] = min(_finite(e.get(m) for e in events), default=None)
    return columns


def pace_columns(run: RunRecord) -> dict[str, Any]:
    """How often the workers published and merged, averaged over the run's workers (each from
    its final metrics): `publishes` sent, `publishes_skipped` (scheduled publishes the I/O
    budget skipped, a later snapshot going instead: raise `io_budget` to publish them), and
    `merges_per_100_steps` applied. Empty when no worker reported them."""
    events = run.final_events()
    return {key: _mean(e.get(key) for e in events) for key in PACE}


def decision_columns(run: RunRecord) -> dict[str, Any]:
    """Merges and drifts issued by the coordinator, acks rejected by workers, wall time."""
    summary = run.json("summary.json") or {}
    by_action = summary.get("decisions", {}).get("by_action", {})
    return {
        "merges": by_action.get("merge", 0),
        "drifts": by_action.get("drift", 0),
        "rejected": summary.get("acknowledged", {}).get("rejected", 0),
        "wall_s": summary.get("wall_s"),
    }


def merge_communities(workers: Sequence[str], edges: Iterable[Mapping[str, Any]]) -> list[int]:
    """Community label of each worker in the merge graph (who merged with whom, weighted by
    the number of merges, both directions summed).

    Louvain (Blondel et al. 2008, networkx `louvain_communities`, seed 0): it maximises weighted
    modularity without being told how many communities there are (the groups are what we want
    to recover, so their number must not be an input), uses the merge counts as weights, and is
    deterministic with a fixed seed. A worker that never merged is a community of its own.
    """
    import networkx as nx  # noqa: PLC0415 (an optional dependency: the worker extra)

    graph = nx.Graph()
    graph.add_nodes_from(workers)
    for e in edges:
        a, b, n = e["worker"], e["partner"], e["merges"]
        w = graph.get_edge_data(a, b, {"weight": 0})["weight"]
        graph.add_edge(a, b, weight=w + n)
    communities = nx.community.louvain_communities(graph, weight="weight", seed=0)
    label = {node: i for i, members in enumerate(communities) for node in members}
    return [label[w] for w in workers]


def cluster_columns(run: RunRecord) -> dict[str, Any]:
    """`ari`: adjusted Rand index (Hubert & Arabie 1985; scikit-learn) between the groups and the
    communities of the merge graph (every merge decided); 1 = merges followed the groups
    exactly, ≈0 = chance. `communities`: how many there were."""
    summary = run.json("summary.json")
    found = _ari(run, summary.get("merge_graph", [])) if summary else None
    return (
        {"ari": found[0], "communities": found[1]} if found else {"ari": None, "communities": None}
    )


def _ari(run: RunRecord, edges: Iterable[Mapping[str, Any]]) -> tuple[float, int] | None:
    """ARI between the workers' groups (config.json) and the communities of a merge graph, and
    the number of communities; None without config.json."""
    from sklearn.metrics import adjusted_rand_score  # noqa: PLC0415 (worker extra)

    config = run.json("config.json")
    if not config:
        return None
    labels = merge_communities([w["name"] for w in config["workers"]], edges)
    groups = [w["group"] for w in config["workers"]]
    return float(adjusted_rand_score(groups, labels)), len(set(labels))


def merge_columns(run: RunRecord) -> dict[str, Any]:
    """Merge decisions against the groups, and the merge gate's figures (decisions.jsonl with
    each decision's ack, the workers' groups from summary.json):

    `merges_within` / `merges_across`: merge decisions whose worker and partner are in the same
    group / different groups; `kept_within` / `kept_across`: those the worker applied (ack
    `applied`, so kept by the gate too); `merges_unacked`: merge decisions no worker acked (they
    arrived after it finished, or it stopped first); `ari_kept`: `ari` over the applied merges
    only. Gate: `gate_checked` merges evaluated on the probe batch (acks carrying both probe
    losses), `gate_rolled_back` of them rejected, `gate_max_kept_rise`: the largest relative
    probe-loss rise, (after − before) / before, among the kept ones (empty when none was kept;
    negative when every kept merge lowered the loss). Empty columns when the run has no
    summary.json; zeros when it made no decision (the independent arm)."""
    summary = run.json("summary.json") or {}
    decisions = run.jsonl("decisions.jsonl")
    group = {w.get("worker_id"): w.get("group") for w in summary.get("workers", [])}
    name = {w.get("worker_id"): w.get("name") for w in summary.get("workers", [])}
    if not group:
        return dict.fromkeys(
            (
                "merges_within",
                "merges_across",
                "kept_within",
                "kept_across",
                "merges_unacked",
                "ari_kept",
                "gate_checked",
                "gate_rolled_back",
                "gate_max_kept_rise",
            )
        )
    counts = dict.fromkeys(
        (
            "merges_within",
            "merges_across",
            "kept_within",
            "kept_across",
            "merges_unacked",
            "gate_checked",
            "gate_rolled_back",
        ),
        0,
    )
    kept_edges: dict[tuple[str, str], int] = {}
    rises: list[float] = []
    for d in decisions:
        if d.get("action") != "merge":
            continue
        where = "within" if group.get(d["worker_id"]) == group.get(d["partner_id"]) else "across"
        counts[f"merges_{where}"] += 1
        ack = d.get("ack") or {}
        applied = ack.get("outcome") == "applied"
        counts["merges_unacked"] += not ack
        if applied:
            counts[f"kept_{where}"] += 1
            edge = (
                name.get(d["worker_id"], d["worker_id"]),
                name.get(d["partner_id"], d["partner_id"]),
            )
            kept_edges[edge] = kept_edges.get(edge, 0) + 1
        before, after = ack.get("probe_loss_before"), ack.get("probe_loss_after")
        if before is None or after is None:
            continue
        counts["gate_checked"] += 1
        counts["gate_rolled_back"] += not applied
        if applied:
            rises.append((after - before) / before if before > 0 else 0.0)
    kept = _ari(run, [{"worker": a, "partner": b, "merges": n} for (a, b), n in kept_edges.items()])
    return {
        **counts,
        "ari_kept": kept[0] if kept else None,
        "gate_max_kept_rise": max(rises, default=None),
    }


def diagnostics_columns(run: RunRecord) -> dict[str, Any]:
    """Final weight diagnostics (`tetherfed.diagnostics.summarize` of each worker folder):
    `effective_rank` (mean over layers), `gzip_ratio` (all layers) and `jacobian_radius`,
    averaged over the workers; `jacobian_first_epoch_over_1`: the first epoch any worker's
    Jacobian radius exceeded 1 (empty when none did). No columns when no worker had diagnostics."""
    from tetherfed.diagnostics import summarize as summarize_worker  # noqa: PLC0415 (worker extra)

    config = run.json("config.json") or {"workers": []}
    found = [summarize_worker(run.folder / w["name"]) for w in config["workers"]]
    found = [f for f in found if f]
    if not found:
        return {}
    firsts = [f["jacobian_first_epoch_over_1"] for f in found]
    return {
        "effective_rank": _mean(f["effective_rank_mean"] for f in found),
        "gzip_ratio": _mean(f["gzip_ratio"] for f in found),
        "jacobian_radius": _mean(f["jacobian_radius"] for f in found),
        "jacobian_first_epoch_over_1": min((e for e in firsts if e is not None), default=None),
    }


COLUMNS: list[ColumnProvider] = [
    identity_columns,
    loss_columns,
    pace_columns,
    decision_columns,
    cluster_columns,
    merge_columns,
    diagnostics_columns,
]


def build_row(run: RunRecord, providers: Sequence[ColumnProvider] = COLUMNS) -> dict[str, Any]:
    """One results.csv row: every provider's columns, in order."""
    row: dict[str, Any] = {}
    for provider in providers:
        row.update(provider(run))
    return row


# -- summary -------------------------------------------------------------------------------------


def ci95(values: Sequence[float]) -> float | None:
    """Half-width of the 95 % confidence interval of the mean (Student t, n − 1 dof)."""
    if len(values) < 2:
        return None
    from scipy.stats import t  # noqa: PLC0415 (scipy comes with scikit-learn)

    return float(t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def describe(values: Sequence[float]) -> dict[str, float | None]:
    """mean, std (sample) and 95 % CI half-width of finite values."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return {
        "mean": statistics.fmean(kept) if kept else None,
        "std": statistics.stdev(kept) if len(kept) > 1 else None,
        "ci95": ci95(kept),
    }


def eval_metrics(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The evaluation metrics among the rows' columns, in order: val_loss, the task metrics
    (val_<name>), then their worst-worker columns (worst_val_loss, worst_val_<name>)."""
    found = {k for r in rows for k in r if "." not in k}
    tasks = sorted(k for k in found if k.startswith("val_") and k != "val_loss")
    return [
        "val_loss",
        *tasks,
        *(f"worst_{m}" for m in ["val_loss", *tasks] if f"worst_{m}" in found),
    ]


def _paired_diffs(
    rows: Sequence[Mapping[str, Any]],
    cell: int,
    arm: str,
    metric: str = "val_loss",
    reference: str = CONTROL,
) -> list[float]:
    """metric(arm) − metric(reference) per repeat of one cell (pairs with both)."""
    by = {(r["arm"], r["repeat"]): r.get(metric) for r in rows if r["cell"] == cell}
    out = []
    for (a, repeat), value in by.items():
        control = by.get((reference, repeat))
        if a == arm and value is not None and control is not None:
            out.append(float(value) - float(control))
    return out


def _cell_mean(rows: Sequence[Mapping[str, Any]], cell: int, arm: str, metric: str) -> float | None:
    """Mean of a metric over the rows of one cell and arm (None when none has it)."""
    values = [r.get(metric) for r in rows if r["cell"] == cell and r["arm"] == arm]
    return describe(values)["mean"]  # type: ignore[arg-type]


def _recovered(arm: float | None, reference: float | None, oracle: float | None) -> float | None:
    """(arm − reference) / (oracle − reference); None when a mean is missing or the oracle
    gains nothing over the reference."""
    if arm is None or reference is None or oracle is None or oracle == reference:
        return None
    return (arm - reference) / (oracle - reference)


def summarize(rows: Sequence[Mapping[str, Any]], reference: str = CONTROL) -> list[dict[str, Any]]:
    """summary.csv rows: per cell and arm, n finished, mean/std/ci95 of each metric
    (`METRICS` and the evaluation metrics, `eval_metrics`), and for each evaluation metric:

    `<metric>_diff_n`, `_diff_mean`, `_diff_ci95`: the paired difference arm − `reference`
    over the repeats with both finished (arms other than the reference only);
    `<metric>_oracle_recovered`: the fraction of the oracle's gain the arm recovers,
    (mean(arm) − mean(reference)) / (mean(oracle) − mean(reference)) over the cell's finished
    runs (so 0 for the reference, 1 for the oracle); empty without an `oracle` arm in the cell,
    without the reference, or when the oracle equals the reference. `reference_arm` names the
    reference."""
    keys = sorted({(r["cell"], r["arm"]) for r in rows}, key=lambda k: (k[0], k[1]))
    evaluated = eval_metrics(rows)
    metrics = list(dict.fromkeys([*METRICS, *evaluated]))
    finished = [r for r in rows if r["state"] == "finished"]
    out = []
    for cell, arm in keys:
        group = [r for r in finished if r["cell"] == cell and r["arm"] == arm]
        first = next(r for r in rows if r["cell"] == cell)
        params = {k: v for k, v in first.items() if "." in k}
        summary: dict[str, Any] = {"cell": cell, "arm": arm, **params, "n": len(group)}
        for metric in metrics:
            for stat, value in describe([r.get(metric) for r in group]).items():  # type: ignore[misc]
                summary[f"{metric}_{stat}"] = value
        summary["reference_arm"] = reference
        has_oracle = any(r["cell"] == cell and r["arm"] == ORACLE for r in rows)
        for metric in evaluated:
            if arm != reference:
                pairs = group + [r for r in finished if r["arm"] == reference]
                diffs = _paired_diffs(pairs, cell, arm, metric, reference)
                d = describe(diffs)
                summary |= {
                    f"{metric}_diff_n": len(diffs),
                    f"{metric}_diff_mean": d["mean"],
                    f"{metric}_diff_ci95": d["ci95"],
                }
            summary[f"{metric}_oracle_recovered"] = (
                _recovered(
                    summary[f"{metric}_mean"],
                    _cell_mean(finished, cell, reference, metric),
                    _cell_mean(finished, cell, ORACLE, metric),
                )
                if has_oracle
                else None
            )
        out.append(summary)
    return out


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows to CSV (the union of their columns, in first-seen order), atomically."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def read_csv(path: Path) -> list[dict[str, Any]]:
    """results.csv back as rows (numbers parsed; empty cells None)."""
    with path.open(newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(value: str) -> Any:
    if value == "":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
