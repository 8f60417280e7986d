"""Per-level robustness figures, Holm flags and the simulated subnet reward."""

from __future__ import annotations

import numpy as np
import pytest

from stage1_core.metrics import robustness as rb


def test_served_answers_round_half_to_class_0():
    assert rb.served_answers(np.array([0.5, 0.5000001, 0.49, 1.0, 0.0])).tolist() == [0, 1, 0, 1, 0]


def test_reward_of_a_perfect_and_of_a_constant_miner():
    labels = np.array([0, 1] * 200)
    assert rb.simulated_reward(labels, labels.astype(float), n_windows=200) == pytest.approx(1.0)
    # constant answers: MCC 0 (one class on the answer side), accuracy ~ 0.5 -> (0.25) ** 3 on average
    constant = rb.simulated_reward(labels, np.ones(len(labels)), n_windows=4000, seed=1)
    assert 0.01 < constant < 0.03
    # the label prior of the windows is the deployment prior, not the data's
    skewed = np.array([1] * 900 + [0] * 100)
    assert rb.simulated_reward(skewed, np.ones(1000), n_windows=4000) == pytest.approx(constant, abs=0.005)


def test_reward_matches_the_formula_on_one_window():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 100)
    answers = np.where(rng.random(100) < 0.8, labels, 1 - labels)
    mcc = max(0.0, float(rb._mcc_rows(labels[None], answers[None])[0]))
    from sklearn.metrics import matthews_corrcoef

    assert mcc == pytest.approx(max(0.0, matthews_corrcoef(labels, answers)))
    acc = float((labels[-10:] == answers[-10:]).mean())
    assert (0.5 * mcc + 0.5 * acc) ** 3 <= 1


def test_prior_confusion_reweights_classes():
    labels = np.array([1] * 90 + [0] * 10)
    answers = np.array([1] * 90 + [1] * 5 + [0] * 5)  # TPR 1, TNR .5
    out = rb.prior_confusion(labels, answers, 0.5)
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["mcc"] == pytest.approx(0.125 / np.sqrt(0.75 * 0.5 * 0.5 * 0.25))  # tp .5, fn 0, tn .25, fp .25


def test_holm_flags():
    assert rb.holm_flags([0.001, 0.02, 0.5, None], 0.05) == [True, True, False, False]
    # 0.02 > 0.05 / 2 once the smallest is rejected at 0.05 / 3 -> stops
    assert rb.holm_flags([0.01, 0.03, 0.04], 0.05) == [True, False, False]
    assert rb.holm_flags([None, None], 0.05) == [False, False]


def test_robustness_row_counts_and_bound():
    labels = np.array([1] * 300 + [0] * 100)
    exits = np.ones(400, bool)
    exits[:50] = False
    exit_labels = labels.copy()
    exit_labels[50:56] = 0  # 6 exited misses among 250 exited positives
    p = np.where(exit_labels == 1, 0.9, 0.1)
    row = rb.robustness_row("level3", labels, exits, exit_labels, p, 0.02, 0.05, n_windows=200)
    assert (row["n_exited_positives"], row["n_false_negatives"]) == (250, 6)
    assert row["fnr_on_exits"] == pytest.approx(6 / 250)
    from scipy.stats import beta, binom

    assert row["fnr_upper_bound"] == pytest.approx(beta.ppf(0.95, 7, 244))
    assert row["p_value_fnr_above_target"] == pytest.approx(binom.sf(5, 250, 0.02))
    assert row["coverage"] == pytest.approx(350 / 400)
    assert row["exit_accuracy"] == pytest.approx(344 / 350)


def test_table_flags_only_levels():
    rng = np.random.default_rng(0)
    labels = np.array([1] * 400 + [0] * 100)

    def view(misses):
        exit_labels = labels.copy()
        exit_labels[:misses] = 0
        return {"labels": labels, "exit": np.ones(500, bool), "exit_label": exit_labels,
                "p_roadwork": np.where(exit_labels == 1, 0.8, 0.2) + rng.normal(0, 0.01, 500)}

    views = {"mixture": view(40), "level0": view(0), "level3": view(40), "clean": view(40)}
    rows = rb.robustness_table(views, 0.02, 0.05, 0.05, n_windows=100)
    flags = {r["view"]: r["significantly_above_target"] for r in rows}
    assert flags == {"mixture": None, "level0": False, "level3": True, "clean": None}
