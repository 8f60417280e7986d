"""Two-stage selective conformal risk control (SCRC) for the FNR on exited positives.

After Xu, Guo & Wei (arXiv 2512.12844), adapted to this project's constraint. The paper's exact
threshold formulas are unverified here; the formulas below are ours, and
``benchmarks/bench_scrc_validity.py`` checks their validity by simulation.

Rule (both variants). ``g(x)`` in [0, 1] is the calibrated gate score, ``q(x)`` the calibrated
class probabilities (Dirichlet), both from calibrators fit *off* val_calib.

Which split fits the calibrators (the pipeline, ``steps/policy.py``). SCRC-I's certificate holds
when the tested sequence - grid, order and chain starts - is fixed by the val_calib *inputs*
without their labels. The grid and the frontier order use the calibrated values of ``g`` and
``q`` themselves (not only their ranks: the error proxy multiplies odds), and a Dirichlet map is
not monotone in max p (it moves the decision boundary), so calibrators fit on val_calib labels
would let those labels shape the tested family. Both calibrators - Dirichlet for ``q`` (L-BFGS,
``calibration_iters`` iterations) and the gate calibrator for ``g`` - are therefore fit on
val_select, and only the certificate uses val_calib; the fit takes each by its role from arrays
tagged with their split by their sample ids (``FitInputs.take``), which enforces the roles.
val_select also chose the checkpoint, which can make the calibrators a little optimistic but
never touches the certificate's validity. SCRC-T's conformal argument needs the same: the
calibrators and its selection rate (:func:`choose_selection_rate`, also on val_select) are fixed
before val_calib and the test batch are seen.

* Stage 1 selects ``x`` iff ``g(x) >= lambda1``.
* Stage 2 builds ``C(x) = {y : q_y(x) >= 1 - lambda2}`` (:func:`prediction_sets`); the sets grow
  with ``lambda2``.
* ``x`` exits iff it is selected and ``|C(x)| == 1``; its answer is the label in ``C(x)``. Every
  other sample defers with the set {0, 1}; an empty ``C(x)`` (possible only for ``lambda2 < 0.5``)
  defers too and is reported as the empty rate.
* FNR_on_exited = #(exit, y=1, answer 0) / #(exit, y=1).

For two classes and ``lambda2 >= 0.5``, ``|C(x)| == 1`` iff ``max q(x) > lambda2`` (up to rounding
at ties) and ``C(x)`` is never empty; a ``lambda2 < 0.5`` exits the subset ``max q >= 1 - lambda2``
of what ``1 - lambda2`` would exit. So both variants search ``lambda2`` in [0.5, 1] only.
``lambda2 = 0.5`` reduces SCRC to the gate policy (every selected sample exits, except exact
ties q = (0.5, 0.5)); ``lambda1 = min g`` reduces it to the softmax policy on ``q``.

SCRC-I (inductive, PAC, :func:`scrc_inductive`)
    Grid without labels (``n_lambda1 x n_lambda2``, default 200 x 200): ``lambda1`` takes the
    values of ``g`` that select the top ``r = 1/n1, 2/n1, ..., 1`` fraction of the calibration
    inputs (``r = 1`` is ``min g``, the softmax extreme); ``lambda2`` takes 0.5 (the gate extreme)
    and, for ``s = 1/n2, ..., (n2-1)/n2``, the ``max q`` value that leaves the top fraction ``s`` of
    the calibration inputs strictly above it. Every grid pair is a candidate policy (in the
    benchmark 100 x 100 certified ~0.7 point more coverage than 40 x 40 and 200 x 200 another
    ~0.3; counting costs O(n2 * N + n1 * n2)). Candidates are put in one sequence without labels (``order=``):

    ``"frontier"`` (default)
        Label-free Pareto path: each candidate gets a *proxy* FNR from the model's own error
        estimates, ``e_i`` = naive-Bayes combination of ``1 - max q_i`` and ``1 - g_i`` (odds
        multiplied, divided by the odds of the mean ``1 - max q``); proxy FNR = sum of ``e_i`` over
        exited answer-0 samples / (that + sum of ``1 - e_i`` over exited answer-1 samples). The
        path keeps, in increasing exit count, the candidates no other candidate beats on both
        exit count and proxy FNR. The proxy only decides the order (power); validity never
        depends on it being right.
    ``"exit_count"``
        All candidates by exit count on the calibration inputs (ties by proxy FNR).

    The sequence, most conservative first, becomes a
    :class:`~.threshold_sweep.CandidateTable` (``n_exited_predicted_positive`` as its running
    maximum, so the label-free chain starts are well defined) and goes through
    :func:`~.threshold_sweep.select_candidates`: exact binomial p-values ``BinomCDF(K; N, target)``
    for H0 "FNR > target" with N exited positives and K of them answered 0, multi-start
    fixed-sequence testing (default) so that P(population FNR_on_exited of the chosen candidate
    > target) <= delta. The chosen candidate is the certified one with the most exits. Nothing
    certified: exit nothing (``lambda1 = lambda2 = None``) and say why.
    The grid and the order use the calibration *inputs* (never labels), like the 1-D sweep, whose
    candidates are the calibration scores themselves. ``sweep_results`` lists the whole sequence
    (or only its tested candidates when it is longer than :data:`MAX_SWEEP_ROWS`). In the benchmark
    (n = 800, 90% roadwork, 500 draws) the frontier order certified within 0.2-0.8 points of the
    better of the gate-only and softmax policies in each scenario, whichever of the two that was
    (each of them fails badly in some scenario); ``"exit_count"`` interleaves candidates of very
    different shape at equal exit counts, so its chains stop at the first bad one (0.51-0.64
    coverage where the frontier reached 0.86 on a 40 x 40 grid).
    ``"gate"`` / ``"softmax"``
        SCRC's special cases as one-parameter families at full resolution: ``lambda2 = 0.5`` with
        ``lambda1`` over every calibration gate score (the gate policy, exit iff g >= lambda1), or
        ``lambda1 = min g`` with ``lambda2`` over every calibration max q (the softmax policy on q),
        by exit count. Certifying them through this function gives the 1-D sweep's result on the
        same scores, up to float rounding where max q ties a threshold (a sample or two).

    Which order (family) to certify is a label-free choice as far as val_calib is concerned when
    it is made on another split: :func:`choose_order` certifies each family on val_select and keeps
    the one with the most certified coverage (on ties the gate family, then softmax, then the
    frontier: the special cases are at full resolution). SCRC then never does much
    worse than its better special case, which the frontier alone does in some scenarios
    (``bench_scrc_validity.py``: 0.8 points below the gate policy where the gate is strict on
    false negatives), and it costs no level: only one family is tested on val_calib.

SCRC-T (transductive, in expectation, :func:`scrc_transductive`)
    For a labelled calibration set of size n and an unlabelled test batch of size m (>= the stated
    minimum): ``lambda1`` is the ``ceil(rate * (n + m))``-th largest of the pooled gate scores (a
    symmetric function of all n + m inputs, so the selected calibration and test samples stay
    exchangeable). On the n_s selected calibration positives, with the set loss
    ``L_i(l) = 1[1 not in C(x_i; l)] = 1[q_1(x_i) < 1 - l]`` (bounded by B = 1, non-increasing in l),
    conformal risk control gives
    ``lambda_hat = inf{l : n_s / (n_s + 1) * R_hat(l) + 1 / (n_s + 1) <= target}``, so
    E[L on a selected test positive] <= target. ``lambda2 = max(lambda_hat, 0.5)``: risk is
    non-increasing in l and exits are most at 0.5, so this is the feasible value with the largest
    coverage. What is controlled is the miss rate among *selected* positives (in expectation over
    calibration and test batch), not FNR_on_exited: since C is never empty here, a miss is an
    exit answered 0, so FNR_on_exited = miss rate / (exit rate among selected positives), which
    can exceed the target. The PAC certificate of the project's constraint is SCRC-I's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import numpy as np

from scipy.special import expit

from ..metrics._inputs import as_labels, as_probs, as_scores
from .bounds import fnr_upper_bound, positives_needed
from .threshold_sweep import DEFAULT_METHOD, DEFAULT_N_STARTS, METHODS, CandidateTable, select_candidates

__all__ = [
    "SCRC_VARIANTS",
    "ORDERS",
    "CHOICE_ORDERS",
    "DEFAULT_ORDER",
    "choose_order",
    "DEFAULT_GRID_SIZE",
    "MIN_TEST_BATCH",
    "SCHEMA_VERSION",
    "SCRCResult",
    "prediction_sets",
    "scrc_exits",
    "scrc_grid",
    "SCRCGrid",
    "scrc_candidate_counts",
    "set_statistics",
    "scrc_inductive",
    "scrc_transductive",
    "scrcparams_document",
    "SELECTION_RATES",
    "choose_selection_rate",
    "GATE_METHODS",
    "check_gate_calibrator",
    "apply_gate_calibration",
]

SCRC_VARIANTS: tuple[str, ...] = ("SCRC-I", "SCRC-T")
GATE_METHODS: tuple[str, ...] = ("platt", "isotonic", "none")
ORDERS: tuple[str, ...] = ("frontier", "exit_count", "gate", "softmax")
#: Families :func:`choose_order` compares on val_select (first wins ties): the special cases first,
#: because they use every calibration score as a candidate while the frontier lives on a grid (on
#: the embedded default's phase 6 a tie on val_select went to the frontier, which then certified
#: 807 exits of val_calib where the gate family certified 810).
CHOICE_ORDERS: tuple[str, ...] = ("gate", "softmax", "frontier")
DEFAULT_ORDER = "frontier"
DEFAULT_GRID_SIZE = 200
_CHUNK_ELEMENTS = 4_000_000  # bounds the [7, n2, N] feature block of one lambda2 chunk
MAX_SWEEP_ROWS = 2000
MIN_TEST_BATCH = 20
SCHEMA_VERSION = 1
_EPS = 1e-12


def _finite(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def check_gate_calibrator(spec: dict[str, Any]) -> dict[str, Any]:
    """Validated flat copy of a gate-calibrator description (plain numbers and lists).

    Flat forms: ``{"method": "platt", "a", "b"}``, ``{"method": "isotonic", "x", "y"[, "input"]}``
    (``input`` "logit", the default, or "sigmoid"), ``{"method": "none"}``. The nested
    ``GateCalibrator.to_dict()`` form (``params`` holding ``a``/``b`` or
    ``x_thresholds``/``y_thresholds``) is accepted and flattened; its ``event`` and ``n_fit``
    are kept.
    """
    if not isinstance(spec, dict):
        raise TypeError(f"gate calibrator must be a dict, got {type(spec).__name__}")
    method = spec.get("method")
    params = spec["params"] if isinstance(spec.get("params"), dict) else spec
    extra: dict[str, Any] = {}
    if "event" in spec:
        if not isinstance(spec["event"], str) or not spec["event"]:
            raise ValueError(f"gate calibrator event must be a non-empty string, got {spec['event']!r}")
        extra["event"] = spec["event"]
    if "n_fit" in spec:
        n_fit = spec["n_fit"]
        if isinstance(n_fit, bool) or not isinstance(n_fit, (int, np.integer)) or n_fit < 0:
            raise ValueError(f"gate calibrator n_fit must be an integer >= 0, got {n_fit!r}")
        extra["n_fit"] = int(n_fit)
    if method == "platt":
        return {"method": "platt", "a": _finite(params.get("a"), "platt a"), "b": _finite(params.get("b"), "platt b"),
                **extra}
    if method == "isotonic":
        x = np.asarray(params.get("x", params.get("x_thresholds", [])), dtype=np.float64)
        y = np.asarray(params.get("y", params.get("y_thresholds", [])), dtype=np.float64)
        if x.ndim != 1 or x.shape != y.shape or x.size == 0:
            raise ValueError(f"isotonic gate calibrator needs x and y of equal non-zero length, got {x.shape}, {y.shape}")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))) or np.any(np.diff(x) < 0):
            raise ValueError("isotonic gate calibrator needs finite x (non-decreasing) and y")
        if np.any(y < 0) or np.any(y > 1):
            raise ValueError("isotonic gate calibrator y values must lie in [0, 1]")
        source = spec.get("input", "logit")
        if source not in ("logit", "sigmoid"):
            raise ValueError(f"isotonic input must be 'logit' or 'sigmoid', got {source!r}")
        out = {"method": "isotonic", "x": x.tolist(), "y": y.tolist(), **extra}
        if "input" in spec:
            out["input"] = source
        return out
    if method == "none":
        return {"method": "none", **extra}
    raise ValueError(f"unknown gate calibration method {method!r}; choose one of {GATE_METHODS}")


def apply_gate_calibration(gate_logits, spec: dict[str, Any]) -> np.ndarray:
    """Calibrated gate score ``g`` in [0, 1] from RAW gate logits ``z`` [N].

    ``"platt"``: ``sigmoid(a z + b)``; ``"isotonic"``: ``np.interp`` of ``z`` (or ``sigmoid(z)``)
    over the stored thresholds, clipped at the ends; ``"none"``: ``sigmoid(z)``.
    """
    spec = check_gate_calibrator(spec)
    z = np.asarray(gate_logits, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(z)):
        raise ValueError("gate_scores (raw gate logits) must be finite")
    method = spec["method"]
    if method == "platt":
        return expit(spec["a"] * z + spec["b"])
    if method == "isotonic":
        source = expit(z) if spec.get("input") == "sigmoid" else z
        return np.interp(source, spec["x"], spec["y"])
    return expit(z)


def _binary_probs(q, name: str = "q", allow_empty: bool = False) -> np.ndarray:
    arr = as_probs(q, name=name, allow_empty=allow_empty)
    if arr.shape[1] != 2:
        raise ValueError(f"SCRC is binary: {name} must be [N, 2], got {arr.shape}")
    return arr


def _check_unit(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return value


def _sets(p: np.ndarray, lambda2) -> np.ndarray:
    """The one membership rule every caller uses (broadcasts over a stack of lambda2 values)."""
    return p >= 1.0 - lambda2


def prediction_sets(q, lambda2: float) -> np.ndarray:
    """Boolean [N, 2] membership of ``C(x) = {y : q_y >= 1 - lambda2}`` (nested: grows with lambda2)."""
    p = _binary_probs(q, allow_empty=True)
    lam = _check_unit(lambda2, "lambda2")
    return _sets(p, lam)


def scrc_exits(g, q, lambda1: float | None, lambda2: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(exit, answer, sets)`` of the SCRC rule; ``None`` thresholds exit nothing.

    ``exit`` = selected and singleton set; ``answer`` is the singleton's label where it exits and
    argmax q elsewhere; ``sets`` is the [N, 2] membership (all False for unselected samples, whose
    stage-2 set is not built).
    """
    p = _binary_probs(q, allow_empty=True)
    scores = np.asarray(g, dtype=np.float64).reshape(-1)
    if scores.shape[0] != p.shape[0]:
        raise ValueError(f"g has {scores.shape[0]} entries, q has {p.shape[0]} rows")
    if not np.all(np.isfinite(scores)):
        raise ValueError("gate scores must be finite")
    argmax = p.argmax(axis=1).astype(np.int64)
    if lambda1 is None or lambda2 is None:
        return np.zeros(p.shape[0], dtype=bool), argmax, np.zeros(p.shape, dtype=bool)
    selected = scores >= float(lambda1)
    sets = prediction_sets(p, lambda2) & selected[:, None]
    singleton = sets.sum(axis=1) == 1
    answer = np.where(singleton, sets[:, 1].astype(np.int64), argmax)
    return singleton, answer, sets


def set_statistics(g, q, labels, lambda1: float | None, lambda2: float | None) -> dict[str, float | None]:
    """Stage-2 set statistics over the *selected* samples (None when nothing is selected).

    ``singleton_rate`` + ``full_rate`` + ``empty_rate`` = 1; ``set_coverage`` = fraction of
    selected samples whose label lies in its set; ``selection_rate`` is over all samples.
    """
    p = _binary_probs(q)
    y = as_labels(labels, n=p.shape[0])
    _, _, sets = scrc_exits(g, p, lambda1, lambda2)
    none = {"selection_rate": 0.0, "singleton_rate": None, "full_rate": None, "empty_rate": None, "set_coverage": None}
    if lambda1 is None or lambda2 is None:
        return none
    selected = np.asarray(g, dtype=np.float64) >= float(lambda1)
    n_sel = int(selected.sum())
    if n_sel == 0:
        return none
    size = sets[selected].sum(axis=1)
    return {
        "selection_rate": n_sel / p.shape[0],
        "singleton_rate": float(np.mean(size == 1)),
        "full_rate": float(np.mean(size == 2)),
        "empty_rate": float(np.mean(size == 0)),
        "set_coverage": float(np.mean(sets[selected, y[selected]])),
    }


def scrc_grid(g, q, n_lambda1: int = DEFAULT_GRID_SIZE, n_lambda2: int = DEFAULT_GRID_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Label-free candidate values ``(lambda1s, lambda2s)`` (each sorted, unique).

    ``lambda1s``: the gate scores selecting the top 1/n1, 2/n1, ..., all of the inputs
    (the last is ``min g``). ``lambda2s``: 0.5 (gate-policy extreme) and the ``max q`` values
    leaving 1/n2, ..., (n2-1)/n2 of the inputs strictly above (singleton), clipped to [0.5, 1].
    """
    if n_lambda1 < 1 or n_lambda2 < 1:
        raise ValueError(f"grid sizes must be >= 1, got {n_lambda1}, {n_lambda2}")
    scores = as_scores(g, "g")
    p = _binary_probs(q)
    if p.shape[0] != scores.shape[0]:
        raise ValueError(f"g has {scores.shape[0]} entries, q has {p.shape[0]} rows")
    n = scores.shape[0]
    g_desc = np.sort(scores)[::-1]
    rates = np.arange(1, n_lambda1 + 1) / n_lambda1
    lambda1s = g_desc[np.clip(np.ceil(rates * n).astype(np.int64) - 1, 0, n - 1)]
    m_desc = np.sort(p.max(axis=1))[::-1]
    fracs = np.arange(1, n_lambda2) / n_lambda2
    idx = np.clip(np.ceil(fracs * n).astype(np.int64), 0, n - 1)
    lambda2s = np.concatenate([[0.5], np.clip(m_desc[idx], 0.5, 1.0)])
    return np.unique(lambda1s), np.unique(lambda2s)


def _error_proxy(g: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Label-free per-sample error probability: naive-Bayes combination of 1 - max q and 1 - g."""
    e_q = np.clip(1.0 - p.max(axis=1), _EPS, 1.0 - _EPS)
    e_g = np.clip(1.0 - np.clip(g, 0.0, 1.0), _EPS, 1.0 - _EPS)
    base = float(np.clip(e_q.mean(), _EPS, 1.0 - _EPS))
    log_odds = np.log(e_q / (1 - e_q)) + np.log(e_g / (1 - e_g)) - math.log(base / (1 - base))
    return 1.0 / (1.0 + np.exp(-log_odds))


@dataclass
class SCRCGrid:
    """Per-candidate calibration counts over the full (lambda1, lambda2) grid, flattened.

    ``n_exited``, ``n_pred_pos`` (exits answered 1) and ``proxy_fnr`` use no label.
    """

    lambda1: np.ndarray
    lambda2: np.ndarray
    n_exited: np.ndarray
    n_pred_pos: np.ndarray
    n_exited_positives: np.ndarray
    n_false_negatives: np.ndarray
    n_correct: np.ndarray
    proxy_fnr: np.ndarray


def _cumulated_counts(ps: np.ndarray, ys: np.ndarray, err: np.ndarray, lambda2s: np.ndarray,
                      n_sel: np.ndarray) -> np.ndarray:
    """[len(lambda2s) * len(n_sel), 7] sums over the first ``n_sel`` (g-sorted) singleton samples."""
    sets = _sets(ps[None, :, :], lambda2s[:, None, None])  # [n2, N, 2]
    singleton = sets.sum(axis=2) == 1
    answer = np.where(singleton, sets[:, :, 1], ps.argmax(axis=1)[None, :]).astype(np.int64)
    pos = np.broadcast_to((ys == 1)[None, :], answer.shape)
    feats = np.stack(
        [
            singleton,
            singleton & (answer == 1),
            singleton & pos,
            singleton & pos & (answer == 0),
            singleton & (answer == ys[None, :]),
            np.where(singleton & (answer == 0), err[None, :], 0.0),
            np.where(singleton, np.where(answer == 0, err[None, :], 1.0 - err[None, :]), 0.0),
        ],
        axis=0,
    ).astype(np.float64)  # [7, n2, N]
    cum = np.zeros(feats.shape[:2] + (feats.shape[2] + 1,))
    np.cumsum(feats, axis=2, out=cum[:, :, 1:])
    return cum[:, :, n_sel].reshape(feats.shape[0], -1).T


def scrc_candidate_counts(g, q, labels, lambda1s, lambda2s) -> SCRCGrid:
    """Counts of every grid candidate (lambda2 major, lambda1 minor), vectorised.

    Samples are sorted by ``g`` once; for each ``lambda2`` the per-sample features of singleton
    samples are cumulated along that order, and each ``lambda1`` reads the cumulative sum at the
    number of samples with ``g >= lambda1``.
    """
    g, p, y = _inputs(g, q, labels)
    lambda1s = np.asarray(lambda1s, dtype=np.float64).reshape(-1)
    lambda2s = np.asarray(lambda2s, dtype=np.float64).reshape(-1)
    for lam2 in lambda2s.tolist():
        _check_unit(lam2, "lambda2")
    order = np.argsort(-g, kind="stable")
    gs, ps, ys = g[order], p[order], y[order]
    err = _error_proxy(gs, ps)
    n_sel = np.searchsorted(-gs, -lambda1s, side="right")  # #{g >= lambda1}
    chunk = max(1, _CHUNK_ELEMENTS // (7 * max(1, gs.shape[0])))
    parts = [_cumulated_counts(ps, ys, err, lambda2s[i : i + chunk], n_sel) for i in range(0, lambda2s.size, chunk)]
    c = np.concatenate(parts, axis=0) if parts else np.zeros((0, 7))
    counts = np.rint(c[:, :5]).astype(np.int64)
    proxy = np.where(c[:, 6] > 0, c[:, 5] / np.maximum(c[:, 6], _EPS), 1.0)
    return SCRCGrid(
        lambda1=np.tile(lambda1s, lambda2s.size),
        lambda2=np.repeat(lambda2s, lambda1s.size),
        n_exited=counts[:, 0],
        n_pred_pos=counts[:, 1],
        n_exited_positives=counts[:, 2],
        n_false_negatives=counts[:, 3],
        n_correct=counts[:, 4],
        proxy_fnr=np.clip(proxy, 0.0, 1.0),
    )


def _candidate_order(grid: SCRCGrid, order: str) -> np.ndarray:
    """Indices of the tested sequence, most conservative (fewest exits) first; uses no label."""
    if order in ("exit_count", "gate", "softmax"):
        return np.lexsort((grid.proxy_fnr, grid.n_exited))
    if order != "frontier":
        raise ValueError(f"unknown SCRC order {order!r}; choose one of {ORDERS}")
    live = np.flatnonzero(grid.n_exited > 0)
    by_exits_desc = live[np.lexsort((grid.proxy_fnr[live], -grid.n_exited[live]))]
    proxy = grid.proxy_fnr[by_exits_desc]
    best_so_far = np.concatenate([[np.inf], np.minimum.accumulate(proxy)[:-1]])
    return by_exits_desc[proxy < best_so_far][::-1]


def _family_grid(g: np.ndarray, p: np.ndarray, order: str, n_lambda1: int, n_lambda2: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Candidate values of the family ``order`` (label-free): the 2-D grid, or one of the 1-D special cases."""
    n = g.shape[0]
    if order == "gate":
        return scrc_grid(g, p, n, 1)[0], np.array([0.5])
    if order == "softmax":
        return np.array([float(g.min())]), scrc_grid(g, p, 1, n)[1]
    return scrc_grid(g, p, n_lambda1, n_lambda2)


def choose_order(g, q, labels, target_fnr: float, delta: float, orders: tuple[str, ...] = CHOICE_ORDERS,
                 **kwargs: Any) -> tuple[str, list[dict[str, Any]]]:
    """The family SCRC-I certifies on val_calib, chosen on a labelled split disjoint from it (val_select).

    Each family in ``orders`` is certified on this split with :func:`scrc_inductive` (``kwargs``
    passed on); the one with the largest certified coverage wins, the first listed on ties (and
    when nothing certifies). Returns ``(order, rows)`` with each family's figures.
    """
    rows = []
    for order in orders:
        r = scrc_inductive(g, q, labels, target_fnr, delta, order=order, **kwargs)
        rows.append({"order": order, "certified": bool(r.certified), "coverage": float(r.coverage),
                     "lambda1": r.lambda1, "lambda2": r.lambda2, "fnr_bound": float(r.fnr_bound)})
    best = max(rows, key=lambda row: (row["coverage"], -orders.index(row["order"])))
    return str(best["order"]), rows


@dataclass
class SCRCResult:
    """Outcome of :func:`scrc_inductive` or :func:`scrc_transductive`.

    ``lambda1 is None`` means "exit nothing" (``certified`` False, ``reason`` says why). Counts
    and rates are on the calibration set; set statistics are over its selected samples
    (:func:`set_statistics`). ``fnr_bound``: SCRC-I, the Clopper-Pearson bound at ``test_level``
    (<= target exactly when certified); SCRC-T, the CRC-adjusted miss rate
    ``n_s/(n_s+1) R_hat + 1/(n_s+1)`` (a bound in expectation, ``guarantee="expectation"``).
    ``calib_exits`` is the calibration exit mask (for coverage at a deployment prior).
    """

    variant: str
    certified: bool
    lambda1: float | None
    lambda2: float | None
    target_fnr: float
    delta: float | None
    method: str
    guarantee: str
    test_level: float | None
    coverage: float
    n_calib: int
    n_exited: int
    n_exited_positives: int
    n_false_negatives: int
    fnr_on_exits: float | None
    fnr_bound: float
    exit_accuracy: float | None
    selection_rate: float
    singleton_rate: float | None
    full_rate: float | None
    empty_rate: float | None
    set_coverage: float | None
    reason: str | None
    n_candidates: int
    method_params: dict[str, Any] = field(default_factory=dict)
    sweep_results: list[dict[str, Any]] = field(default_factory=list)
    n_test: int | None = None
    test_coverage: float | None = None
    calib_exits: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the exit mask left out)."""
        out = asdict(self)
        out.pop("calib_exits")
        return out


def _calib_summary(g: np.ndarray, p: np.ndarray, y: np.ndarray, lambda1, lambda2) -> dict[str, Any]:
    exits, answer, _ = scrc_exits(g, p, lambda1, lambda2)
    pos = exits & (y == 1)
    n_exit, n_pos = int(exits.sum()), int(pos.sum())
    n_fn = int((pos & (answer == 0)).sum())
    n_ok = int((exits & (answer == y)).sum())
    return {
        "coverage": n_exit / y.shape[0],
        "n_exited": n_exit,
        "n_exited_positives": n_pos,
        "n_false_negatives": n_fn,
        "fnr_on_exits": n_fn / n_pos if n_pos else None,
        "exit_accuracy": n_ok / n_exit if n_exit else None,
        "calib_exits": exits,
        **set_statistics(g, p, y, lambda1, lambda2),
    }


def _check_rates(target_fnr: float, delta: float | None) -> None:
    if not 0.0 < target_fnr < 1.0:
        raise ValueError(f"target_fnr must lie in (0, 1), got {target_fnr!r}")
    if delta is not None and not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")


def _inputs(g, q, labels, name: str = "calib") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = _binary_probs(q, name=f"q_{name}")
    scores = as_scores(g, f"g_{name}", n=p.shape[0])
    y = as_labels(labels, n=p.shape[0])
    return scores, p, y


def scrc_inductive(
    g,
    q,
    labels,
    target_fnr: float,
    delta: float,
    method: str = DEFAULT_METHOD,
    n_starts: int = DEFAULT_N_STARTS,
    n_lambda1: int = DEFAULT_GRID_SIZE,
    n_lambda2: int = DEFAULT_GRID_SIZE,
    order: str = DEFAULT_ORDER,
) -> SCRCResult:
    """SCRC-I: (lambda1, lambda2) with FNR_on_exited certified <= ``target_fnr`` w.p. >= 1 - ``delta``.

    ``g`` [N] calibrated gate scores, ``q`` [N, 2] calibrated probabilities and ``labels`` of
    val_calib. Among certified candidates the one with the most calibration exits is returned.
    """
    _check_rates(target_fnr, delta)
    if method not in METHODS:
        raise ValueError(f"unknown certification method {method!r}; choose one of {METHODS}")
    if order not in ORDERS:
        raise ValueError(f"unknown SCRC order {order!r}; choose one of {ORDERS}")
    scores, p, y = _inputs(g, q, labels)
    lambda1s, lambda2s = _family_grid(scores, p, order, n_lambda1, n_lambda2)
    grid = scrc_candidate_counts(scores, p, y, lambda1s, lambda2s)
    seq = _candidate_order(grid, order)
    n = int(y.shape[0])
    table = CandidateTable(
        thresholds=np.arange(seq.shape[0], dtype=np.float64),
        n_exited=grid.n_exited[seq],
        n_exited_predicted_positive=np.maximum.accumulate(grid.n_pred_pos[seq]) if seq.size else grid.n_pred_pos[seq],
        n_exited_positives=grid.n_exited_positives[seq],
        n_false_negatives=grid.n_false_negatives[seq],
        n_exited_correct=grid.n_correct[seq],
        n_calib=n,
        n_positives=int((y == 1).sum()),
    )
    sel = select_candidates(table, target_fnr, delta, method=method, n_starts=n_starts)
    bounds = np.asarray(fnr_upper_bound(table.n_false_negatives, table.n_exited_positives, sel.test_level))
    keep = np.arange(seq.size) if seq.size <= MAX_SWEEP_ROWS else np.flatnonzero(sel.tested)
    sweep = [
        {
            "lambda1": float(grid.lambda1[seq[i]]),
            "lambda2": float(grid.lambda2[seq[i]]),
            "n_exited": int(grid.n_exited[seq[i]]),
            "n_exited_positives": int(grid.n_exited_positives[seq[i]]),
            "n_false_negatives": int(grid.n_false_negatives[seq[i]]),
            "proxy_fnr": float(grid.proxy_fnr[seq[i]]),
            "p_value": float(sel.pvalues[i]),
            "fnr_upper_bound": float(bounds[i]),
            "tested": bool(sel.tested[i]),
            "certified": bool(sel.rejected[i]),
        }
        for i in keep.tolist()
    ]
    params = dict(sel.params, order=order, n_lambda1=int(lambda1s.size), n_lambda2=int(lambda2s.size),
                  n_grid=int(grid.n_exited.size), sweep_rows="all" if seq.size <= MAX_SWEEP_ROWS else "tested")
    common = dict(
        variant="SCRC-I",
        target_fnr=float(target_fnr),
        delta=float(delta),
        method=method,
        guarantee="pac",
        test_level=float(sel.test_level),
        n_calib=n,
        n_candidates=int(seq.size),
        method_params=params,
        sweep_results=sweep,
    )
    chosen = sel.chosen
    if chosen is not None:
        j = int(seq[chosen])
        lam1, lam2 = float(grid.lambda1[j]), float(grid.lambda2[j])
        summary = _calib_summary(scores, p, y, lam1, lam2)
        return SCRCResult(
            certified=True,
            lambda1=lam1,
            lambda2=lam2,
            fnr_bound=float(bounds[chosen]),
            reason=None,
            **summary,
            **common,
        )
    summary = _calib_summary(scores, p, y, None, None)
    return SCRCResult(
        certified=False,
        lambda1=None,
        lambda2=None,
        fnr_bound=1.0,
        reason=_why_nothing(table, bounds, target_fnr, delta, method, sel.test_level),
        **summary,
        **common,
    )


def _why_nothing(table: CandidateTable, bounds: np.ndarray, target: float, delta: float, method: str,
                 level: float) -> str:
    needed = positives_needed(target, level, 0)
    head = (
        f"no SCRC candidate (lambda1, lambda2) certifies FNR_on_exited <= {target:g} with probability >= "
        f"{1 - delta:g} (method {method}, per-test level {level:.3g}, {len(table)} candidates)"
    )
    tail = (
        f" Certifying needs N >= {needed} exited positives with K = 0 misses (the calibration set has "
        f"{table.n_positives} positives of {table.n_calib} samples); the policy exits nothing."
    )
    if len(table) == 0:
        return head + ": no candidate exits any calibration sample." + tail
    best = int(np.argmin(bounds))
    return (
        head + f": the lowest upper bound, {bounds[best]:.4f}, has K = {int(table.n_false_negatives[best])} "
        f"missed of N = {int(table.n_exited_positives[best])} exited positives." + tail
    )


def scrc_transductive(
    g_calib,
    q_calib,
    y_calib,
    g_test,
    q_test,
    target_fnr: float,
    selection_rate: float,
    min_test: int = MIN_TEST_BATCH,
    delta: float | None = None,
) -> SCRCResult:
    """SCRC-T: thresholds from val_calib plus the unlabelled test batch (CRC, in expectation).

    ``selection_rate`` in (0, 1] is the pooled fraction stage 1 selects; choose it without
    val_calib labels (:func:`choose_selection_rate` on val_select). Refuses a test batch smaller
    than ``min_test``; ``min_test=0`` with an empty batch gives the *reference* thresholds of
    val_calib alone (what ``scrcparams.json`` records; deployment always recomputes them with its
    batch). ``delta`` is only recorded (the level of the Clopper-Pearson figures reported beside
    the expectation guarantee), never used. See the module docstring for what is guaranteed.
    """
    _check_rates(target_fnr, delta)
    rate = _check_unit(selection_rate, "selection_rate")
    if rate <= 0.0:
        raise ValueError("selection_rate must be > 0")
    if min_test < 0:
        raise ValueError(f"min_test must be >= 0, got {min_test}")
    scores, p, y = _inputs(g_calib, q_calib, y_calib)
    q_t = _binary_probs(q_test, name="q_test", allow_empty=True)
    if q_t.shape[0] < min_test:
        raise ValueError(
            f"SCRC-T needs a test batch of at least {min_test} samples, got {q_t.shape[0]}: thresholds "
            f"from a tiny batch are unstable; use SCRC-I (scrc_inductive) instead"
        )
    g_t = as_scores(g_test, "g_test", n=q_t.shape[0]) if q_t.shape[0] else np.zeros(0)
    pooled = np.sort(np.concatenate([scores, g_t]))[::-1]
    k = max(1, math.ceil(rate * pooled.shape[0] - 1e-9))
    lam1 = float(pooled[k - 1])
    positives = (scores >= lam1) & (y == 1)
    n_s = int(positives.sum())
    q1 = p[positives, 1]
    allowed = math.floor((n_s + 1) * target_fnr - 1 + 1e-9)  # misses R_hat may hold
    n = int(y.shape[0])
    common = dict(
        variant="SCRC-T",
        target_fnr=float(target_fnr),
        delta=None if delta is None else float(delta),
        method="crc",
        guarantee="expectation",
        test_level=None,
        n_calib=n,
        n_candidates=1,
        n_test=int(q_t.shape[0]) or None,
    )
    params = {"selection_rate": rate, "n_selected_positives": n_s, "allowed_misses": max(allowed, -1), "B": 1}
    if allowed < 0:
        needed = math.ceil(1.0 / target_fnr - 1.0 - 1e-9)
        summary = _calib_summary(scores, p, y, None, None)
        return SCRCResult(
            certified=False,
            lambda1=None,
            lambda2=None,
            fnr_bound=1.0,
            reason=(
                f"SCRC-T: CRC cannot reach miss rate {target_fnr:g} with n_s = {n_s} selected calibration "
                f"positives (N = {n_s}, K = 0 still gives 1/(n_s + 1) > target; needs n_s >= {needed}); "
                f"the policy exits nothing."
            ),
            method_params=params,
            test_coverage=0.0 if q_t.shape[0] else None,
            **summary,
            **common,
        )
    s_desc = np.sort(1.0 - q1)[::-1]
    lam_hat = float(s_desc[allowed]) if allowed < n_s else 0.0
    lam2 = min(1.0, max(lam_hat, 0.5))

    def misses(lam: float) -> int:
        return int((~prediction_sets(p[positives], lam)[:, 1]).sum())

    while misses(lam2) > allowed and lam2 < 1.0:  # rounding in 1 - (1 - q1) at the boundary
        lam2 = float(np.nextafter(lam2, 2.0))
    lam2 = min(lam2, 1.0)
    r_hat = misses(lam2) / n_s if n_s else 0.0
    bound = n_s / (n_s + 1) * r_hat + 1.0 / (n_s + 1)
    summary = _calib_summary(scores, p, y, lam1, lam2)
    test_exits, _, _ = scrc_exits(g_t, q_t, lam1, lam2) if q_t.shape[0] else (np.zeros(0, dtype=bool), None, None)
    params.update(lambda_hat=lam_hat, r_hat=r_hat)
    return SCRCResult(
        certified=True,
        lambda1=lam1,
        lambda2=lam2,
        fnr_bound=float(bound),
        reason=None,
        method_params=params,
        test_coverage=float(test_exits.mean()) if test_exits.size else None,
        **summary,
        **common,
    )


#: Selection rates :func:`choose_selection_rate` tries by default.
SELECTION_RATES: tuple[float, ...] = tuple(round(i / 20, 4) for i in range(1, 21))


def choose_selection_rate(g, q, labels, target_fnr: float, rates=SELECTION_RATES) -> tuple[float, list[dict[str, Any]]]:
    """SCRC-T's stage-1 selection rate, chosen on a labelled split disjoint from val_calib (val_select).

    For each rate, SCRC-T's reference thresholds on this split alone (:func:`scrc_transductive`
    with an empty batch) and the coverage they give on it; the rate with the most coverage wins
    (ties: the larger rate). Choosing it here keeps it independent of val_calib and of the test
    batch, as the CRC argument needs. When no rate can meet the target (too few positives), the
    largest rate is returned: it selects the most positives. Returns ``(rate, rows)``.
    """
    _check_rates(target_fnr, None)
    scores, p, y = _inputs(g, q, labels, name="select")
    values = sorted({_check_unit(r, "selection rate") for r in rates})
    if not values or values[0] <= 0.0:
        raise ValueError(f"selection rates must lie in (0, 1], got {list(rates)!r}")
    rows = []
    for rate in values:
        r = scrc_transductive(scores, p, y, scores[:0], p[:0], target_fnr, rate, min_test=0)
        rows.append({"selection_rate": rate, "feasible": bool(r.certified), "coverage": float(r.coverage),
                     "lambda1": r.lambda1, "lambda2": r.lambda2})
    best = max(rows, key=lambda row: (row["coverage"], row["selection_rate"]))
    return float(best["selection_rate"]), rows


def _version() -> str:
    try:
        return metadata.version("stage1-pro")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def scrcparams_document(
    result: SCRCResult,
    calibrator: dict[str, Any],
    gate_calibrator: dict[str, Any],
    checkpoint_id: str,
    deploy_prior: float,
    coverage_at_deploy_prior: float,
    metrics: dict[str, Any] | None = None,
    version: str | None = None,
    calibrator_fit_split: str | None = None,
    special_cases: dict[str, Any] | None = None,
    transductive: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``scrcparams.json`` content (schema ``scrcparams``) for an SCRC result.

    ``calibrator`` is the class-probability calibrator (``DirichletCalibrator.to_dict()`` or
    ``{"method": "none"}``), ``gate_calibrator`` the map from the raw gate logit to ``g``
    (``{"method": "platt", "a", "b"}``, ``{"method": "isotonic", "x", "y"}`` or
    ``{"method": "none"}``, or ``GateCalibrator.to_dict()``, stored flattened), both fit off
    val_calib (``calibrator_fit_split`` names the split). ``special_cases`` holds the gate-only
    and softmax policies certified on the same calibrated scores for comparison;
    ``transductive`` (SCRC-T only, required there) the selection rate, the smallest batch and
    the file holding the val_calib outputs the thresholds are recomputed from at prediction time.
    """
    if result.variant == "SCRC-T" and not transductive:
        raise ValueError("an SCRC-T policy needs its transductive settings (selection_rate, min_test, calibration_file)")
    if not checkpoint_id:
        raise ValueError("checkpoint_id must name the checkpoint the policy was fit for")
    if not 0.0 <= deploy_prior <= 1.0:
        raise ValueError(f"deploy_prior must lie in [0, 1], got {deploy_prior!r}")
    if not 0.0 <= coverage_at_deploy_prior <= 1.0:
        raise ValueError(f"coverage_at_deploy_prior must lie in [0, 1], got {coverage_at_deploy_prior!r}")
    doc = {
        "schema_version": SCHEMA_VERSION,
        "policy": "scrc",
        "scrc_variant": result.variant,
        "checkpoint_id": checkpoint_id,
        "lambda1": result.lambda1,
        "lambda2": result.lambda2,
        "certified": result.certified,
        "reason": result.reason,
        "method": result.method,
        "method_params": dict(result.method_params),
        "guarantee": result.guarantee,
        "target_fnr": result.target_fnr,
        "delta": result.delta,
        "test_level": result.test_level,
        "fnr_on_exits": result.fnr_on_exits,
        "fnr_bound": result.fnr_bound,
        "n_false_negatives": result.n_false_negatives,
        "n_exited_positives": result.n_exited_positives,
        "n_exited": result.n_exited,
        "coverage": result.coverage,
        "coverage_at_deploy_prior": float(coverage_at_deploy_prior),
        "deploy_prior": float(deploy_prior),
        "exit_accuracy": result.exit_accuracy,
        "selection_rate": result.selection_rate,
        "set_statistics": {
            "singleton_rate": result.singleton_rate,
            "full_rate": result.full_rate,
            "empty_rate": result.empty_rate,
            "set_coverage": result.set_coverage,
        },
        "n_calib": result.n_calib,
        "n_candidates": result.n_candidates,
        "n_test": result.n_test,
        "test_coverage": result.test_coverage,
        "calibrator": dict(calibrator),
        "gate_calibrator": check_gate_calibrator(gate_calibrator),
        "sweep_results": list(result.sweep_results),
        "metrics": dict(metrics or {}),
        "version": version or _version(),
    }
    if calibrator_fit_split is not None:
        doc["calibrator_fit_split"] = calibrator_fit_split
    if special_cases is not None:
        doc["special_cases"] = dict(special_cases)
    if transductive is not None:
        doc["transductive"] = dict(transductive)
    return doc
