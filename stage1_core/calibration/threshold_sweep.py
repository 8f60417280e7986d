"""Certified softmax exit threshold: the largest coverage whose FNR on exited positives is
certified <= ``target_fnr`` with probability >= 1 - ``delta``.

Exit rule: a sample exits iff ``max(p) >= t``. Candidates are every distinct max-probability on
the calibration set, ordered from the most conservative (highest t, fewest exits) to the most
permissive. For candidate t with N exited positives of which K are predicted negative, the exact
p-value of H0 "FNR(t) > target" is ``BinomCDF(K; N, target)`` (:mod:`.bounds`). Choosing among
many candidates needs family-wise error control; the methods (``method=``):

``"multistart_fixed_sequence"`` (default, ``n_starts=2``)
    Learn-then-Test fixed-sequence testing with several starts (Angelopoulos et al. 2021).
    Candidates are indexed by how many calibration samples they exit. The first chain starts at
    the first candidate whose exited samples include 1.25 x (the positives needed with zero
    misses at the chain level) *predicted* positives - fewer positives can never certify; the
    others start at exit counts spaced geometrically from there up to ``n_calib``. Each chain
    walks towards more coverage at level ``delta / n_starts`` and stops at its first
    non-rejection. Starts depend on the model outputs only, never on labels, so Bonferroni over
    chains gives FWER <= delta. A single chain from the top stalls where too few positives exit;
    two starts cover both a certifiable region near the top (weak models) and one far down
    (good models), and the later start skips an early cluster of misses. Measured on known
    score distributions (target 0.02, delta 0.05, n_calib 600-5000, 20-90% positives), two
    starts placed this way gave the highest mean coverage among the variants tried (1-3 starts;
    starts by exit count, predicted positives or coverage; coarser steps) and beat SGR
    everywhere.
``"sgr_binary_search"``
    SGR (Geifman & El-Yaniv 2017): binary search over the ordered candidates with Bonferroni
    over the ``ceil(log2(m + 1))`` tests it may make.
``"fixed_sequence"``
    One chain at level ``delta`` (``n_starts=1``).
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
    "score_candidate_table",
    "certify_score_threshold",
    "Selection",
    "select_candidates",
    "certify_softmax_threshold",
    "thresholds_document",
    "SCHEMA_VERSION",
]

SEED_GRID: tuple[float, ...] = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.95)
METHODS: tuple[str, ...] = ("multistart_fixed_sequence", "sgr_binary_search", "fixed_sequence", "bonferroni")
DEFAULT_METHOD = "multistart_fixed_sequence"
DEFAULT_N_STARTS = 2
# The first chain starts where START_FACTOR x (positives needed with zero misses at the chain
# level) exited samples are *predicted* positive; the other starts are spaced geometrically in
# exit count from there up to n_calib.
START_FACTOR = 1.25
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class CandidateTable:
    """Exit statistics of every candidate threshold, highest threshold first.

    ``n_exited`` and ``n_exited_predicted_positive`` depend on the model outputs only (no
    label); the other counts use the labels.
    """

    thresholds: np.ndarray
    n_exited: np.ndarray
    n_exited_predicted_positive: np.ndarray
    n_exited_positives: np.ndarray
    n_false_negatives: np.ndarray
    n_exited_correct: np.ndarray
    n_calib: int
    n_positives: int

    def __len__(self) -> int:
        return int(self.thresholds.shape[0])


def _binary_probs(probs) -> np.ndarray:
    p = as_probs(probs)
    if p.shape[1] != 2:
        raise ValueError(f"the softmax exit policy is binary: probs must be [N, 2], got {p.shape}")
    return p


def candidate_table(probs, labels) -> CandidateTable:
    """Counts behind FNR_on_exited for every distinct max-probability of ``probs``."""
    p = _binary_probs(probs)
    return score_candidate_table(p.max(axis=1), p.argmax(axis=1), labels)


def score_candidate_table(scores, predictions, labels) -> CandidateTable:
    """Counts behind FNR_on_exited for every distinct value of an exit score (exit iff score >= t).

    ``scores`` is any per-sample confidence (max softmax, a calibrated gate score, ...), and
    ``predictions`` the label each sample would exit with. Tied scores enter or leave together.
    """
    conf = np.asarray(scores, dtype=np.float64).reshape(-1)
    if conf.size == 0 or not np.all(np.isfinite(conf)):
        raise ValueError("exit scores must be a non-empty array of finite numbers")
    pred = np.asarray(predictions).reshape(-1).astype(np.int64)
    if pred.shape != conf.shape:
        raise ValueError(f"predictions has {pred.shape[0]} entries, scores {conf.shape[0]}")
    y = as_labels(labels, n=conf.shape[0])
    values, inverse = np.unique(-conf, return_inverse=True)
    m = values.shape[0]

    def cum(mask: np.ndarray) -> np.ndarray:
        return np.cumsum(np.bincount(inverse, weights=mask.astype(np.float64), minlength=m)).astype(np.int64)

    return CandidateTable(
        thresholds=-values,
        n_exited=cum(np.ones_like(y, dtype=bool)),
        n_exited_predicted_positive=cum(pred == 1),
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
    """Index of the first candidate whose exit count could hold enough positives to certify.

    Uses no label: a candidate exiting fewer samples than the positives needed with zero misses
    can never be rejected, so SGR does not spend one of its tests there.
    """
    needed = positives_needed(target, level, 0)
    return int(np.searchsorted(table.n_exited, needed, side="left"))


def _run_chain(pvalues: np.ndarray, start: int, level: float, tested: np.ndarray, rejected: np.ndarray) -> None:
    """Fixed-sequence test from ``start`` towards more coverage; stop at the first non-rejection."""
    for j in range(start, pvalues.shape[0]):
        tested[j] = True
        if pvalues[j] > level:
            return
        rejected[j] = True


def _multistart(
    table: CandidateTable, pvalues: np.ndarray, target: float, delta: float, n_starts: int
) -> Selection:
    if n_starts < 1:
        raise ValueError(f"n_starts must be >= 1, got {n_starts}")
    m = len(table)
    level = delta / n_starts
    tested = np.zeros(m, dtype=bool)
    rejected = np.zeros(m, dtype=bool)
    needed = START_FACTOR * positives_needed(target, level, 0)
    first = int(np.searchsorted(table.n_exited_predicted_positive, needed, side="left"))
    starts: list[int] = []
    if first < m:
        lo = float(table.n_exited[first])
        ratio = (table.n_calib / lo) ** (1.0 / n_starts)
        goals = [lo * ratio**i for i in range(n_starts)]
        starts = sorted({int(np.searchsorted(table.n_exited, g, side="left")) for g in goals} - {m})
    for s in starts:
        _run_chain(pvalues, s, level, tested, rejected)
    return Selection(
        tested, rejected, level, {"n_starts": n_starts, "start_exit_counts": [int(table.n_exited[s]) for s in starts]}
    )


def _fixed_sequence(table: CandidateTable, pvalues: np.ndarray, target: float, delta: float) -> Selection:
    selection = _multistart(table, pvalues, target, delta, 1)
    selection.params.pop("n_starts")
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


def _sweep_rows(table: CandidateTable, sel: Selection, bounds: np.ndarray) -> list[dict[str, Any]]:
    """One JSON-ready row per candidate (plain Python types)."""
    columns = zip(
        table.thresholds.tolist(),
        table.n_exited.tolist(),
        table.n_exited_positives.tolist(),
        table.n_false_negatives.tolist(),
        table.n_exited_correct.tolist(),
        sel.pvalues.tolist(),
        bounds.tolist(),
        sel.tested.tolist(),
        sel.rejected.tolist(),
    )
    n = table.n_calib
    return [
        {
            "threshold": t,
            "n_exited": n_exit,
            "coverage": n_exit / n,
            "n_exited_positives": n_pos,
            "n_false_negatives": n_fn,
            "fnr_on_exits": n_fn / n_pos if n_pos else None,
            "exit_accuracy": n_ok / n_exit if n_exit else None,
            "p_value": p,
            "fnr_upper_bound": b,
            "tested": tested,
            "certified": rejected,
        }
        for t, n_exit, n_pos, n_fn, n_ok, p, b, tested, rejected in columns
    ]


def _grid_rows(probs: np.ndarray, labels: np.ndarray, target: float, delta: float) -> list[dict[str, Any]]:
    """Statistics of the seed's fixed grid, for comparison only (bound at level delta, unadjusted)."""
    conf = probs.max(axis=1)
    pred = probs.argmax(axis=1)
    exits = conf[None, :] >= np.asarray(SEED_GRID)[:, None]
    pos = exits & (labels == 1)
    n_exit, n_pos = exits.sum(axis=1), pos.sum(axis=1)
    n_fn = (pos & (pred == 0)).sum(axis=1)
    n_ok = (exits & (pred == labels)).sum(axis=1)
    pvalues = binomial_pvalue(n_fn, n_pos, target)
    bounds = fnr_upper_bound(n_fn, n_pos, delta)
    n = labels.shape[0]
    return [
        {
            "threshold": t,
            "n_exited": int(e),
            "coverage": int(e) / n,
            "n_exited_positives": int(np_),
            "n_false_negatives": int(f),
            "fnr_on_exits": int(f) / int(np_) if np_ else None,
            "exit_accuracy": int(ok) / int(e) if e else None,
            "p_value": float(p),
            "fnr_upper_bound_unadjusted": float(b),
        }
        for t, e, np_, f, ok, p, b in zip(SEED_GRID, n_exit, n_pos, n_fn, n_ok, pvalues, bounds)
    ]


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

    def certificate_fields(self) -> dict[str, Any]:
        """The certificate as every policy file records it (method, target, delta, N, K, bound, coverage)."""
        return {
            "certified": self.certified,
            "reason": self.reason,
            "method": self.method,
            "method_params": self.method_params,
            "target_fnr": self.target_fnr,
            "delta": self.delta,
            "test_level": self.test_level,
            "fnr_on_exits": self.fnr_on_exits,
            "fnr_upper_bound": self.fnr_upper_bound,
            "coverage": self.coverage,
            "exit_accuracy": self.exit_accuracy,
            "n_calib": self.n_calib,
            "n_candidates": self.n_candidates,
            "n_exited_positives": self.n_exited_positives,
            "n_false_negatives": self.n_false_negatives,
        }


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
    p = _binary_probs(probs)
    y = as_labels(labels, n=p.shape[0])
    result = certify_score_threshold(p.max(axis=1), p.argmax(axis=1), y, target_fnr, delta, method, n_starts)
    result.grid_results = _grid_rows(p, y, target_fnr, delta)
    return result


def certify_score_threshold(
    scores,
    predictions,
    labels,
    target_fnr: float,
    delta: float,
    method: str = DEFAULT_METHOD,
    n_starts: int = DEFAULT_N_STARTS,
) -> CertificationResult:
    """Largest-coverage rule "exit iff score >= t" with FNR_on_exited certified <= ``target_fnr``.

    The same family-wise-error-controlled binomial test as the softmax threshold, for any exit
    score (the calibrated gate score in phase 3). Candidate order and chain starts use only
    ``scores`` and ``predictions``, never the labels. ``grid_results`` is empty here.
    """
    if not 0.0 < target_fnr < 1.0:
        raise ValueError(f"target_fnr must lie in (0, 1), got {target_fnr!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    table = score_candidate_table(scores, predictions, labels)
    sel = select_candidates(table, target_fnr, delta, method=method, n_starts=n_starts)
    bounds = np.asarray(fnr_upper_bound(table.n_false_negatives, table.n_exited_positives, sel.test_level))
    sweep = _sweep_rows(table, sel, bounds)
    common = dict(
        n_calib=table.n_calib,
        method=method,
        target_fnr=float(target_fnr),
        delta=float(delta),
        test_level=float(sel.test_level),
        n_candidates=len(table),
        method_params=sel.params,
        sweep_results=sweep,
        grid_results=[],
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
        **result.certificate_fields(),
        "coverage_at_deploy_prior": float(coverage_at_deploy_prior),
        "deploy_prior": float(deploy_prior),
        "sweep_results": result.sweep_results,
        "grid_results": result.grid_results,
        "val_calib_metrics": dict(val_calib_metrics),
    }
