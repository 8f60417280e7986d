"""Certified softmax exit threshold: the largest coverage whose FNR on exited positives is
certified <= ``target_fnr`` with probability >= 1 - ``delta``.

Exit rule: a sample exits iff ``max(p) >= t``. Candidates are every distinct max-probability on
the calibration set, ordered from the most conservative (highest t, fewest exits) to the most
permissive. For candidate t with N exited positives of which K are predicted negative, the exact
p-value of H0 "FNR(t) > target" is ``BinomCDF(K; N, target)`` (:mod:`.bounds`). Choosing among
many candidates needs family-wise error control; the methods (``method=``):

``"multistart_fixed_sequence"`` (default)
    Learn-then-Test fixed-sequence testing with several starts (Angelopoulos et al. 2021). The
    ordered candidates are entered at ``n_starts`` points spread evenly in exit count between
    the first candidate that could possibly certify (exit count >= the positives needed with
    zero misses at the per-chain level) and the last; each chain walks towards more coverage at
    level ``delta / n_starts`` and stops at its first non-rejection. Starts depend only on the
    confidences, never on labels, so Bonferroni over chains gives FWER <= delta. It does not
    stall where few positives exit (a single chain from the top does), and a later start
    skips over an early cluster of misses.
``"sgr_binary_search"``
    SGR (Geifman & El-Yaniv 2017): binary search over the ordered candidates with Bonferroni
    over the ``ceil(log2(m + 1))`` tests it may make.
``"fixed_sequence"``
    One chain at level ``delta`` from the first candidate that could certify.
``"bonferroni"``
    Every candidate tested at ``delta / m``.

Every method returns the rejected candidate with the largest coverage. The default was chosen
with ``benchmarks/bench_certification_validity.py`` (validity and coverage on known score
distributions). When nothing certifies the result exits nothing and says why - there is no
fallback threshold. :data:`SEED_GRID` is evaluated too, for comparison only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..metrics._inputs import as_labels, as_probs
from .bounds import binomial_pvalue, fnr_upper_bound, positives_needed

__all__ = [
    "SEED_GRID",
    "METHODS",
    "DEFAULT_METHOD",
    "DEFAULT_N_STARTS",
    "CertificationResult",
    "CandidateTable",
    "candidate_table",
    "Selection",
    "select_candidates",
    "certify_softmax_threshold",
    "thresholds_document",
    "SCHEMA_VERSION",
]

SEED_GRID: tuple[float, ...] = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.95)
METHODS: tuple[str, ...] = ("multistart_fixed_sequence", "sgr_binary_search", "fixed_sequence", "bonferroni")
DEFAULT_METHOD = "multistart_fixed_sequence"
DEFAULT_N_STARTS = 4
SCHEMA_VERSION = "1.0"


@dataclass(frozen=True)
class CandidateTable:
    """Exit statistics of every candidate threshold, highest threshold first.

    ``n_exited`` depends on the confidences only; the other counts use the labels.
    """

    thresholds: np.ndarray
    n_exited: np.ndarray
    n_exited_positives: np.ndarray
    n_false_negatives: np.ndarray
    n_exited_correct: np.ndarray
    n_calib: int
    n_positives: int

    def __len__(self) -> int:
        return int(self.thresholds.shape[0])


def candidate_table(probs, labels) -> CandidateTable:
    """Counts behind FNR_on_exited for every distinct max-probability of ``probs``."""
    p = as_probs(probs)
    if p.shape[1] != 2:
        raise ValueError(f"the softmax exit policy is binary: probs must be [N, 2], got {p.shape}")
    y = as_labels(labels, n=p.shape[0])
    conf = p.max(axis=1)
    pred = p.argmax(axis=1)
    values, inverse = np.unique(-conf, return_inverse=True)
    m = values.shape[0]

    def cum(mask: np.ndarray) -> np.ndarray:
        return np.cumsum(np.bincount(inverse, weights=mask.astype(np.float64), minlength=m)).astype(np.int64)

    return CandidateTable(
        thresholds=-values,
        n_exited=cum(np.ones_like(y, dtype=bool)),
        n_exited_positives=cum(y == 1),
        n_false_negatives=cum((y == 1) & (pred == 0)),
        n_exited_correct=cum(pred == y),
        n_calib=int(y.shape[0]),
        n_positives=int((y == 1).sum()),
    )


@dataclass
class Selection:
    """What a multiple-testing method did: which candidates it tested and rejected, at which level."""

    tested: np.ndarray
    rejected: np.ndarray
    test_level: float
    params: dict[str, Any] = field(default_factory=dict)
    pvalues: np.ndarray | None = None

    @property
    def chosen(self) -> int | None:
        """Index of the rejected candidate with the largest coverage (None: nothing certified)."""
        hits = np.flatnonzero(self.rejected)
        return int(hits.max()) if hits.size else None


def _first_feasible(table: CandidateTable, target: float, level: float) -> int:
    """Index of the first candidate whose *exit count* could hold enough positives to certify.

    Uses no label: a candidate exiting fewer samples than the positives needed with zero misses
    can never be rejected, so starting a chain there would only stop it.
    """
    needed = positives_needed(target, level, 0)
    return int(np.searchsorted(table.n_exited, needed, side="left"))


def _run_chain(pvalues: np.ndarray, start: int, level: float, tested: np.ndarray, rejected: np.ndarray) -> None:
    for j in range(start, pvalues.shape[0]):
        tested[j] = True
        if pvalues[j] > level:
            return
        rejected[j] = True


def _multistart(table: CandidateTable, pvalues: np.ndarray, target: float, delta: float, n_starts: int) -> Selection:
    if n_starts < 1:
        raise ValueError(f"n_starts must be >= 1, got {n_starts}")
    m = len(table)
    level = delta / n_starts
    tested = np.zeros(m, dtype=bool)
    rejected = np.zeros(m, dtype=bool)
    first = _first_feasible(table, target, level)
    starts: list[int] = []
    if first < m:
        lo = table.n_exited[first]
        for i in range(n_starts):
            goal = lo + i * (table.n_calib - lo) / n_starts
            starts.append(int(np.searchsorted(table.n_exited, goal, side="left")))
        starts = sorted(set(starts))
    for s in starts:
        _run_chain(pvalues, s, level, tested, rejected)
    return Selection(tested, rejected, level, {"n_starts": n_starts, "start_indices": starts})


def _fixed_sequence(table: CandidateTable, pvalues: np.ndarray, target: float, delta: float) -> Selection:
    selection = _multistart(table, pvalues, target, delta, 1)
    selection.params = {"start_indices": selection.params["start_indices"]}
    return selection


def _sgr(table: CandidateTable, pvalues: np.ndarray, target: float, delta: float) -> Selection:
    m = len(table)
    n_tests = max(1, math.ceil(math.log2(m + 1)))
    level = delta / n_tests
    tested = np.zeros(m, dtype=bool)
    rejected = np.zeros(m, dtype=bool)
    lo, hi = _first_feasible(table, target, level) - 1, m  # lo: last known pass, hi: first known fail
    made = 0
    while hi - lo > 1 and made < n_tests:
        mid = (lo + hi) // 2
        tested[mid] = True
        made += 1
        if pvalues[mid] <= level:
            rejected[mid] = True
            lo = mid
        else:
            hi = mid
    return Selection(tested, rejected, level, {"n_tests": n_tests})


def _bonferroni(table: CandidateTable, pvalues: np.ndarray, target: float, delta: float) -> Selection:
    m = len(table)
    level = delta / m
    tested = np.ones(m, dtype=bool)
    return Selection(tested, pvalues <= level, level, {"n_tests": m})


def select_candidates(
    table: CandidateTable,
    target_fnr: float,
    delta: float,
    method: str = DEFAULT_METHOD,
    n_starts: int = DEFAULT_N_STARTS,
) -> "Selection":
    """Run one multiple-testing ``method`` over ``table``; the pick is ``Selection.chosen``."""
    if method not in METHODS:
        raise ValueError(f"unknown certification method {method!r}; choose one of {METHODS}")
    pvalues = np.asarray(binomial_pvalue(table.n_false_negatives, table.n_exited_positives, target_fnr))
    if method == "multistart_fixed_sequence":
        sel = _multistart(table, pvalues, target_fnr, delta, n_starts)
    elif method == "sgr_binary_search":
        sel = _sgr(table, pvalues, target_fnr, delta)
    elif method == "fixed_sequence":
        sel = _fixed_sequence(table, pvalues, target_fnr, delta)
    else:
        sel = _bonferroni(table, pvalues, target_fnr, delta)
    sel.pvalues = pvalues
    return sel


def _row(table: CandidateTable, j: int) -> dict[str, Any]:
    n_exit = int(table.n_exited[j])
    n_pos = int(table.n_exited_positives[j])
    n_fn = int(table.n_false_negatives[j])
    return {
        "threshold": float(table.thresholds[j]),
        "n_exited": n_exit,
        "coverage": n_exit / table.n_calib,
        "n_exited_positives": n_pos,
        "n_false_negatives": n_fn,
        "fnr_on_exits": n_fn / n_pos if n_pos else None,
        "exit_accuracy": int(table.n_exited_correct[j]) / n_exit if n_exit else None,
    }


def _grid_rows(probs: np.ndarray, labels: np.ndarray, target: float, delta: float) -> list[dict[str, Any]]:
    conf = probs.max(axis=1)
    pred = probs.argmax(axis=1)
    rows = []
    for t in SEED_GRID:
        exits = conf >= t
        pos = exits & (labels == 1)
        n_exit, n_pos, n_fn = int(exits.sum()), int(pos.sum()), int((pos & (pred == 0)).sum())
        rows.append(
            {
                "threshold": t,
                "n_exited": n_exit,
                "coverage": n_exit / labels.shape[0],
                "n_exited_positives": n_pos,
                "n_false_negatives": n_fn,
                "fnr_on_exits": n_fn / n_pos if n_pos else None,
                "exit_accuracy": int((exits & (pred == labels)).sum()) / n_exit if n_exit else None,
                "p_value": binomial_pvalue(n_fn, n_pos, target),
                "fnr_upper_bound_unadjusted": fnr_upper_bound(n_fn, n_pos, delta),
            }
        )
    return rows


@dataclass
class CertificationResult:
    """Outcome of :func:`certify_softmax_threshold`.

    ``exit_threshold is None`` means "exit nothing" (``certified`` is False and ``reason`` says
    why). ``fnr_upper_bound`` is the one-sided Clopper-Pearson bound at the per-test level the
    method used (``test_level``), so it is <= ``target_fnr`` exactly when certified.
    """

    certified: bool
    exit_threshold: float | None
    coverage: float
    fnr_on_exits: float | None
    fnr_upper_bound: float
    n_exited_positives: int
    n_false_negatives: int
    n_calib: int
    exit_accuracy: float | None
    method: str
    reason: str | None
    target_fnr: float
    delta: float
    test_level: float
    n_candidates: int
    method_params: dict[str, Any]
    sweep_results: list[dict[str, Any]]
    grid_results: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def certify_softmax_threshold(
    probs,
    labels,
    target_fnr: float,
    delta: float,
    method: str = DEFAULT_METHOD,
    n_starts: int = DEFAULT_N_STARTS,
) -> CertificationResult:
    """Largest-coverage threshold with FNR_on_exited certified <= ``target_fnr`` w.p. >= 1 - ``delta``.

    Fit it on val_calib probabilities of the selected checkpoint only. ``n_starts`` applies to
    ``"multistart_fixed_sequence"``. See the module docstring for the methods.
    """
    if not 0.0 < target_fnr < 1.0:
        raise ValueError(f"target_fnr must lie in (0, 1), got {target_fnr!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    p = as_probs(probs)
    y = as_labels(labels, n=p.shape[0])
    table = candidate_table(p, y)
    sel = select_candidates(table, target_fnr, delta, method=method, n_starts=n_starts)
    pvalues = sel.pvalues

    bounds = np.asarray(fnr_upper_bound(table.n_false_negatives, table.n_exited_positives, sel.test_level))
    sweep = []
    for j in range(len(table)):
        row = _row(table, j)
        row.update(
            p_value=float(pvalues[j]),
            fnr_upper_bound=float(bounds[j]),
            tested=bool(sel.tested[j]),
            certified=bool(sel.rejected[j]),
        )
        sweep.append(row)
    common = dict(
        n_calib=table.n_calib,
        method=method,
        target_fnr=float(target_fnr),
        delta=float(delta),
        test_level=float(sel.test_level),
        n_candidates=len(table),
        method_params=sel.params,
        sweep_results=sweep,
        grid_results=_grid_rows(p, y, target_fnr, delta),
    )
    if sel.chosen is not None:
        row = sweep[sel.chosen]
        return CertificationResult(
            certified=True,
            exit_threshold=row["threshold"],
            coverage=row["coverage"],
            fnr_on_exits=row["fnr_on_exits"],
            fnr_upper_bound=row["fnr_upper_bound"],
            n_exited_positives=row["n_exited_positives"],
            n_false_negatives=row["n_false_negatives"],
            exit_accuracy=row["exit_accuracy"],
            reason=None,
            **common,
        )
    return CertificationResult(
        certified=False,
        exit_threshold=None,
        coverage=0.0,
        fnr_on_exits=None,
        fnr_upper_bound=1.0,
        n_exited_positives=0,
        n_false_negatives=0,
        exit_accuracy=None,
        reason=_why_nothing(table, bounds, target_fnr, delta, method, sel.test_level),
        **common,
    )


def _why_nothing(
    table: CandidateTable, bounds: np.ndarray, target: float, delta: float, method: str, level: float
) -> str:
    needed = positives_needed(target, level, 0)
    best = int(np.argmin(bounds))
    return (
        f"no candidate threshold certifies FNR_on_exited <= {target:g} with probability >= "
        f"{1 - delta:g} (method {method}, per-test level {level:.3g}): the lowest upper bound, "
        f"{bounds[best]:.4f} at threshold {table.thresholds[best]:.6g}, has "
        f"{int(table.n_false_negatives[best])} missed of {int(table.n_exited_positives[best])} "
        f"exited positives. Certifying needs at least {needed} exited positives with 0 misses "
        f"(the calibration set has {table.n_positives} positives of {table.n_calib} samples); "
        f"the policy exits nothing."
    )


def thresholds_document(
    result: CertificationResult,
    val_calib_metrics: dict[str, Any],
    checkpoint_id: str,
    deploy_prior: float,
    coverage_at_deploy_prior: float,
) -> dict[str, Any]:
    """The ``thresholds.json`` content (schema ``thresholds``) for a certification result."""
    if not checkpoint_id:
        raise ValueError("checkpoint_id must name the checkpoint the threshold was fit for")
    if not 0.0 <= deploy_prior <= 1.0:
        raise ValueError(f"deploy_prior must lie in [0, 1], got {deploy_prior!r}")
    return {
        "schema_version": SCHEMA_VERSION,
        "policy": "softmax",
        "checkpoint_id": checkpoint_id,
        "exit_threshold": result.exit_threshold,
        "certified": result.certified,
        "reason": result.reason,
        "method": result.method,
        "method_params": result.method_params,
        "target_fnr": result.target_fnr,
        "delta": result.delta,
        "test_level": result.test_level,
        "fnr_on_exits": result.fnr_on_exits,
        "fnr_upper_bound": result.fnr_upper_bound,
        "coverage": result.coverage,
        "coverage_at_deploy_prior": float(coverage_at_deploy_prior),
        "deploy_prior": float(deploy_prior),
        "exit_accuracy": result.exit_accuracy,
        "n_calib": result.n_calib,
        "n_candidates": result.n_candidates,
        "n_exited_positives": result.n_exited_positives,
        "n_false_negatives": result.n_false_negatives,
        "sweep_results": result.sweep_results,
        "grid_results": result.grid_results,
        "val_calib_metrics": dict(val_calib_metrics),
    }
