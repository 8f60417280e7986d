"""Conformal risk training for the exit score (Yeh et al., NeurIPS 2025; ConfTr, Stutz et al. 2022).

The deployed exit rule is "exit iff s >= t" with t certified on val_calib. Conformal risk
training simulates that calibration inside every batch so the score learns to be *certifiable*:

1. Split the batch into a pseudo-calibration part (``fraction`` of it, at least ``min_calib``
   samples) and a pseudo-prediction part, stratified by label (each part keeps the batch's class
   mix) and deterministic given a ``torch.Generator``.
2. On the pseudo-calibration positives, sorted by score descending u_1 >= ... >= u_n with miss
   indicators m_j = 1[prediction_j = 0] and M_k = m_1 + ... + m_k, take the CRC index

       k* = max{k in 1..n : (M_k + 1) / (k + 1) <= target_fnr}      (0 when no k qualifies)

   (the CRC finite-sample correction with loss bound B = 1; ``crc_correction=False`` uses
   M_k / k). Exiting the top k* positives meets the target; positive k* + 1 is always a miss (a
   hit would lower the ratio), so the hard threshold is tau = u_{k*+1}: exit iff s > tau
   (tau = -inf when k* = n, every positive may exit).
3. Smooth it as Yeh et al. do: thr = mean of u_j for j in [k*+1-w, k*+1+w] (clipped to 1..n),
   w = floor(window * n) - a window of about ``window`` of the positives around the critical
   miss. The index k* is piecewise constant; thr keeps the gradient of the sorted scores it
   averages (it is not detached), so training pushes the critical misses down. With window -> 0
   thr is exactly tau. When k* = n, thr = min of the pseudo-calibration scores.
4. On the pseudo-prediction part, reward the smoothed coverage
   c = mean_j sigmoid((s_j - thr) / temperature) and, optionally, penalise its smoothed FNR
   F = sum_{y=1} m sigmoid(.) / sum_{y=1} sigmoid(.):

       loss = -c + fnr_penalty * relu(F - target_fnr)^2

``fnr_penalty=0`` is the pure form of Yeh et al. It only reshapes the score through the few
critical misses the threshold averages, and stalls once the scores saturate (probabilities near
1 with temperature 0.1 have vanishing sigmoid gradients): on a toy score from a bad start it left
certified coverage at 0, while ``fnr_penalty=1`` (the default) or raw logits with temperature 1
lifted it to ~0.76. Scores need not lie in [0, 1]; pick ``temperature`` on their scale.

The window is what smooths the threshold; ``temperature`` smooths only the coverage (as it
falls, the smoothed coverage tends to the hard coverage 1[s > thr]). A batch whose
pseudo-calibration part has fewer than ceil(1 / target_fnr - 1) positives (49 at 0.02) cannot
meet the target at any k (the ratio is >= 1 / (k + 1)); the loss is then a zero with a graph and
``figures["skipped"]`` is True. Use batches of >= 2 x min_calib samples. The deployed guarantee
always comes from a fresh hard calibration on val_calib.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["ConformalRiskTrainingLoss", "ConformalRiskHeadLoss", "check_crt_batch", "crc_index"]


def crc_index(misses_sorted: torch.Tensor, target_fnr: float, crc_correction: bool = True) -> int:
    """CRC index k* of positives sorted by score descending, from their miss indicators (module docstring)."""
    m = misses_sorted.detach().to(torch.float64).reshape(-1)
    if m.numel() == 0:
        return 0
    k = torch.arange(1, m.numel() + 1, dtype=torch.float64, device=m.device)
    cum = torch.cumsum(m, dim=0)
    ratio = (cum + 1.0) / (k + 1.0) if crc_correction else cum / k
    ok = torch.nonzero(ratio <= target_fnr).reshape(-1)
    return int(ok.max().item()) + 1 if ok.numel() else 0


class ConformalRiskTrainingLoss(nn.Module):
    """Smoothed-coverage loss of an exit score under an in-batch FNR calibration (module docstring).

    ``forward(scores, predictions, labels, generator=None) -> (loss, figures)``: ``scores`` [B]
    with exit iff score high (sigmoid of the gate logit, max softmax probability, or a raw logit
    with a temperature on its scale), ``predictions`` [B] hard labels or [B, 2]
    probabilities/logits (argmax is taken), ``labels`` [B]; ``generator`` (CPU) fixes the split.
    ``figures`` holds plain numbers: the smoothed threshold, the hard one (None when every
    positive may exit), k*, part sizes, smoothed and hard coverage and FNR of the
    pseudo-prediction part, and ``skipped``.
    """

    def __init__(
        self,
        target_fnr: float = 0.02,
        temperature: float = 0.1,
        fraction: float = 0.5,
        min_calib: int = 200,
        window: float = 0.005,
        fnr_penalty: float = 1.0,
        crc_correction: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < target_fnr < 1.0:
            raise ValueError(f"target_fnr must lie in (0, 1), got {target_fnr!r}")
        if not temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must lie in (0, 1), got {fraction!r}")
        if min_calib < 1:
            raise ValueError(f"min_calib must be >= 1, got {min_calib!r}")
        if not 0.0 <= window < 0.5:
            raise ValueError(f"window must lie in [0, 0.5), got {window!r}")
        if fnr_penalty < 0.0:
            raise ValueError(f"fnr_penalty must be >= 0, got {fnr_penalty!r}")
        self.target_fnr = float(target_fnr)
        self.temperature = float(temperature)
        self.fraction = float(fraction)
        self.min_calib = int(min_calib)
        self.window = float(window)
        self.fnr_penalty = float(fnr_penalty)
        self.crc_correction = bool(crc_correction)

    @property
    def min_calib_positives(self) -> int:
        """Fewest pseudo-calibration positives for which some k can meet the target."""
        if not self.crc_correction:
            return 1
        return max(1, math.ceil(1.0 / self.target_fnr - 1.0 - 1e-9))

    def split(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stratified (pseudo-calibration, pseudo-prediction) index tensors.

        The pseudo-calibration part has max(round(fraction * B), min_calib) samples, split across
        classes in proportion; when that is the whole batch the prediction part is empty.
        """
        labels = labels.reshape(-1)
        b = labels.shape[0]
        n_cal = max(int(round(self.fraction * b)), self.min_calib)
        if n_cal >= b:
            empty = torch.zeros(0, dtype=torch.long, device=labels.device)
            return torch.arange(b, device=labels.device), empty
        cal, pred = [], []
        for c in torch.unique(labels).tolist():
            idx = torch.nonzero(labels == c).reshape(-1)
            perm = torch.randperm(idx.numel(), generator=generator, device="cpu").to(idx.device)
            idx = idx[perm]
            take = int(round(idx.numel() * n_cal / b))
            cal.append(idx[:take])
            pred.append(idx[take:])
        return torch.cat(cal), torch.cat(pred)

    def smooth_threshold(self, scores: torch.Tensor, misses: torch.Tensor) -> tuple[torch.Tensor, int, float]:
        """(smoothed threshold, k*, hard threshold tau) from pseudo-calibration positives' scores and misses."""
        u, order = torch.sort(scores.reshape(-1), descending=True)
        m = misses.reshape(-1)[order]
        n = u.numel()
        k_star = crc_index(m, self.target_fnr, self.crc_correction)
        if k_star >= n:
            return u[-1], k_star, -math.inf
        w = int(math.floor(self.window * n))
        lo, hi = max(0, k_star - w), min(n, k_star + w + 1)  # 0-based: the critical miss is u[k_star]
        return u[lo:hi].mean(), k_star, float(u[k_star].detach())

    def forward(
        self,
        scores: torch.Tensor,
        predictions: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        s = scores.reshape(-1)
        labels = labels.reshape(-1).long()
        preds = predictions.argmax(dim=1) if predictions.dim() == 2 else predictions.reshape(-1)
        preds = preds.long().to(labels.device)
        if s.shape[0] != labels.shape[0] or preds.shape[0] != labels.shape[0]:
            raise ValueError(
                f"scores ({s.shape[0]}), predictions ({preds.shape[0]}) and labels ({labels.shape[0]}) differ in length"
            )
        positive = labels == 1
        misses = (positive & (preds == 0)).to(s.dtype)
        cal, pred = self.split(labels, generator)
        cal_pos = cal[positive[cal]]
        figures: dict[str, Any] = {
            "n_calib": int(cal.numel()),
            "n_calib_positives": int(cal_pos.numel()),
            "n_predict": int(pred.numel()),
        }
        if pred.numel() == 0 or cal_pos.numel() < self.min_calib_positives:
            figures.update(skipped=True, threshold=None, hard_threshold=None, k_star=None)
            return s.sum() * 0.0, figures
        thr, k_star, tau = self.smooth_threshold(s[cal_pos], misses[cal_pos])
        if k_star >= cal_pos.numel():
            thr = s[cal].min()
        soft = torch.sigmoid((s[pred] - thr) / self.temperature)
        coverage = soft.mean()
        pred_pos = positive[pred].to(s.dtype)
        pred_miss = misses[pred]
        fnr_soft = (soft * pred_pos * pred_miss).sum() / ((soft * pred_pos).sum() + 1e-6)
        loss = -coverage + self.fnr_penalty * torch.relu(fnr_soft - self.target_fnr) ** 2
        with torch.no_grad():
            hard_exit = s[pred] > thr
            n_pos_exit = int((hard_exit & (pred_pos > 0)).sum())
            n_fn = int((hard_exit & (pred_miss > 0)).sum())
        figures.update(
            skipped=False,
            threshold=float(thr.detach()),
            hard_threshold=None if math.isinf(tau) else tau,
            k_star=k_star,
            coverage_smooth=float(coverage.detach()),
            coverage_hard=float(hard_exit.float().mean()),
            fnr_smooth=float(fnr_soft.detach()),
            fnr_hard=n_fn / n_pos_exit if n_pos_exit else None,
        )
        return loss, figures


class ConformalRiskHeadLoss(nn.Module):
    """Phase-6 loss of the gated head: ``CE(cls) + aux_weight * CE(aux) + crt_weight * L_crt``.

    ``L_crt`` is :class:`ConformalRiskTrainingLoss` on the exit score ``s = sigmoid(gate logit)``
    (the score SCRC's stage 1 selects on, before its monotone calibration) with the class head's
    hard predictions as answers: a miss is a positive predicted 0, exactly the event FNR on
    exits counts. The answers are hard (argmax), so ``L_crt`` trains the gate and the shared
    trunk; the class head learns from the cross-entropy. Callable as ``loss(output, labels)``
    (the trainer's ``loss_fn``). The in-batch split uses torch's global RNG, which the trainer
    seeds and saves in its checkpoints, so a resumed run splits as an uninterrupted one would.

    ``batch_size`` is the batch the trainer slices from cached features for this loss: each half
    of a batch needs enough positives for the in-batch calibration (see :func:`check_crt_batch`).
    ``last_components`` holds the terms of the latest call as floats; ``n_calls`` / ``n_skipped``
    count the batches whose pseudo-calibration half was too small to calibrate.
    """

    def __init__(
        self,
        cls_criterion: nn.Module,
        crt: ConformalRiskTrainingLoss,
        aux: nn.Module | None = None,
        crt_weight: float = 1.0,
        aux_weight: float = 0.5,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        from stage1_core.training.losses import AuxiliaryLoss

        if crt_weight < 0 or aux_weight < 0:
            raise ValueError(f"crt_weight and aux_weight must be >= 0, got {crt_weight!r}, {aux_weight!r}")
        if batch_size is not None and batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 or None, got {batch_size!r}")
        self.cls_criterion = cls_criterion
        self.crt = crt
        if aux is None:
            weight = getattr(cls_criterion, "weight", None)
            aux = AuxiliaryLoss(weight, float(getattr(cls_criterion, "label_smoothing", 0.0)))
        self.aux = aux
        self.crt_weight = float(crt_weight)
        self.aux_weight = float(aux_weight)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.n_calls = 0
        self.n_skipped = 0
        self._last: dict[str, torch.Tensor] = {}
        self.last_figures: dict[str, Any] = {}

    @property
    def last_components(self) -> dict[str, float]:
        """The terms of the latest ``forward`` call as floats (empty before the first call)."""
        return {k: float(v) for k, v in self._last.items()}

    def components(self, output, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every term as a tensor: ``total``, ``cls``, ``aux`` and ``crt`` (L_crt, unweighted)."""
        labels = labels.long()
        logits = output.logits.float()
        if output.gate is None:
            raise ValueError("conformal risk training needs the gated head (Stage1Head(with_gate=True))")
        cls = self.cls_criterion(logits, labels)
        aux = self.aux(output, labels)
        scores = torch.sigmoid(output.gate.float().reshape(-1))
        crt, figures = self.crt(scores, logits.detach(), labels)
        self.last_figures = figures
        self.n_calls += 1
        self.n_skipped += int(bool(figures["skipped"]))
        total = cls + self.aux_weight * aux + self.crt_weight * crt
        return {"total": total, "cls": cls, "aux": aux, "crt": crt}

    def forward(self, output, labels: torch.Tensor) -> torch.Tensor:
        parts = self.components(output, labels)
        self._last = {k: v.detach() for k, v in parts.items()}
        return parts["total"]


def check_crt_batch(batch_size: int, positive_rate: float, crt: ConformalRiskTrainingLoss, slack: float = 1.5) -> None:
    """Refuse a batch size whose halves cannot run the in-batch calibration (ValueError saying what to set).

    The pseudo-calibration half has ``max(round(fraction * B), min_calib)`` samples and must leave a
    pseudo-prediction half; it needs at least ``crt.min_calib_positives`` positives (49 at a 2%
    target), expected ``slack`` times over so that most batches calibrate.
    """
    n_cal = max(int(round(crt.fraction * batch_size)), crt.min_calib)
    if n_cal >= batch_size:
        raise ValueError(
            f"crt_batch_size={batch_size} leaves no pseudo-prediction half: the pseudo-calibration half takes "
            f"max(crt_fraction x batch, {crt.min_calib}) = {n_cal} samples; set crt_batch_size > {crt.min_calib / crt.fraction:.0f}"
        )
    expected = n_cal * positive_rate
    needed = slack * crt.min_calib_positives
    if expected < needed:
        raise ValueError(
            f"crt_batch_size={batch_size}: the pseudo-calibration half holds ~{expected:.0f} positives (positive "
            f"rate {positive_rate:.2f}), but calibrating FNR <= {crt.target_fnr:g} in a batch needs "
            f">= {crt.min_calib_positives} ({needed:.0f} expected); raise crt_batch_size to "
            f">= {math.ceil(needed / (positive_rate * crt.fraction))}"
        )
