"""Losses: the baseline's class-weighted, label-smoothed cross-entropy, and the phase-3 losses of
the gated head (``Stage1Head(with_gate=True)`` -> ``HeadOutput(logits, gate, aux)``).

SelectiveNet (Geifman & El-Yaniv 2019) trains a gate g = sigmoid(gate logit) as a *soft*
acceptance weight: a hard mask 1[g >= t] has zero gradient almost everywhere, so the gate would
never learn. Its coverage constraint needs a target coverage, which this project forbids; the
gate is instead rewarded for soft coverage and penalised when the soft FNR on accepted positives
exceeds the target:

    g_i      = sigmoid(gate_i)
    phi      = mean_i g_i                                            (soft coverage)
    m_i      = sigmoid((z0_i - z1_i) / miss_temperature)             (soft "predicted negative")
               = p0_i at miss_temperature 1, 1[argmax = 0] at miss_temperature 0
    FNR_soft = sum_{y_i=1} g_i m_i / (sum_{y_i=1} g_i + eps)
    r        = mean_i(l_i g_i) / (phi + eps)                         (selective risk, l = per-sample CE)
    c_i      = 1[argmax z_i = y_i]                                   (detached: "this prediction is correct")
    L_sel    = risk_weight * r - coverage_weight * phi
               + fnr_penalty * relu(FNR_soft - target_fnr)^2          (squared hinge)
               + correct_weight * mean_i BCE(gate_i, c_i)             (a proper score for "correct")
               + lambda_t * (FNR_soft - target_fnr)                   (only with dual_lr: Lagrangian term)

The squared hinge is smooth at the target, so the gate settles just above it instead of
chattering across a kink as a linear hinge does. With ``dual_lr`` set, lambda_t is a multiplier
updated after every forward call in training mode (CRC-Select style projected dual ascent):

    lambda_{t+1} = clamp(lambda_t + dual_lr * (FNR_soft_t - target_fnr), 0, dual_max)

m is detached by default (``detach_miss=True``): the FNR term then moves the gate only (it learns
to reject where positives are predicted negative) and the class head is trained by the plain CE
and the selective risk; letting it flow would push the class head towards predicting positive
on accepted samples, trading exit accuracy for FNR. Only positives predicted negative count as
misses, so the gate is free to accept confident positive predictions and must be strict on
negative predictions (METHODS section 4) - unlike the symmetric max-softmax rule.

Defaults (hard misses, fnr_penalty 100) come from a toy run: 8-D Gaussian features, ~70%
positives, one region with random labels, 400 Adam steps, then the gate certified at target 0.02,
delta 0.05 on a held-out calibration set (mean certified coverage over three seeds). Hard misses
beat p0 (0.44 against 0.34 at penalty 100); penalty 30 gave 0.49, 100 gave 0.44, 300 gave 0.39,
and 10 or less certified nothing (the gate accepts broadly and its top is no longer free of
misses); the dual update (dual_lr 1, fnr_penalty 0) gave 0.47. The max-softmax threshold
certified nothing on the same data. Judge the settings by certified coverage on real features.

Exit accuracy (``correct_weight``, and the gate's margin input of ``Stage1Head``). The terms above
alone price a wrong exit only through the gate-weighted CE, and the sigmoid gate saturates: on
the embedded default the gate ranked "correct" worse than the max-softmax confidence *on the
training split itself* (AUROC 0.73 against 0.87, train accuracy 0.93: not a shortage of training
errors) and bought its coverage with exited false positives, which the FNR certificate does not
count. Two changes fix it together: the BCE of the gate logit against c_i, a proper scoring rule
whose gradient does not vanish when the sigmoid saturates (it makes the gate estimate
P(correct | x), before the FNR terms tilt it against misses of roadwork), and the detached class
margin as a gate input (a gate linear in the trunk cannot express the confidence |z1 - z0|).
Measured with ``benchmarks/tune_gate.py --artifacts ART --config configs/default.yaml --field
seed --values 1,2,3,4,5,6,7,8`` (ART: an artifacts root where phase 1 ran on the embedded
default; the first three rows add ``--set gate_correct_weight=0 gate_margin_input=false``,
``--set gate_correct_weight=0`` and ``--set gate_margin_input=false``; gate and softmax both
certified on val_calib; val_test never read), gate minus softmax in points, mean over the eight
seeds (worst seed), val_select / val_calib:

    knobs                              coverage                      exit accuracy
    neither (the earlier default)      +2.4 (-5.6) / +2.1 (-5.2)     -1.13 (-1.74) / -1.04 (-1.23)
    margin input only                  +9.6 (+7.3) / +9.2 (+6.9)     -1.71 (-2.15) / -1.10 (-1.45)
    gate_correct_weight 10 only        +7.2 (+4.2) / +7.0 (+3.3)     -0.75 (-2.36) / -0.90 (-2.58)
    both (embedded default)            +4.8 (+3.4) / +3.3 (+2.4)     -0.18 (-0.26) / +0.01 (-0.19)

(``gate_loss_weight`` 0.3, ``gate_fnr_penalty`` 200, ``gate_risk_weight`` 30 in every row.) The
class head's val_select accuracy with both: 0.920-0.924 (phase 2: 0.922); with the BCE alone it
fell to 0.913 on one seed. Scratch runs (seeds 1-4) that did not help: a squared-hinge penalty
on the soft error rate of accepted samples (both classes, target 0.02, weight 1000) with the
margin input (-1.48 / -1.15 points of exit accuracy); raising ``gate_risk_weight`` to 50-100
with the margin input and no BCE (the saturating gate collapsed on some seeds and certified
nothing).
"""

from __future__ import annotations

import torch
from torch import nn

CLASS_WEIGHT_EPS = 1e-6


def class_weights(labels: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """Inverse-frequency weights ``total / (k * count + 1e-6)`` (float32, one per class).

    Raises ``ValueError`` when a class has no sample: its weight would be ``total / 1e-6`` and
    the loss would be dominated by a class that cannot be learnt.
    """
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if labels.numel() == 0:
        raise ValueError("cannot compute class weights from an empty label set")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], found {sorted(set(labels.tolist()))[:10]}")
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    absent = [c for c in range(num_classes) if counts[c] == 0]
    if absent:
        raise ValueError(
            f"the training labels contain no sample of class(es) {absent} (counts {counts.long().tolist()}); "
            f"a binary head needs both 0 (no roadwork) and 1 (roadwork) in the training split"
        )
    total = float(labels.numel())
    return (total / (num_classes * counts + CLASS_WEIGHT_EPS)).to(torch.float32)


def build_criterion(
    labels: torch.Tensor,
    label_smoothing: float,
    device: str | torch.device = "cpu",
    num_classes: int = 2,
    weighted: bool = True,
) -> nn.CrossEntropyLoss:
    """``CrossEntropyLoss(weight=class_weights(labels), label_smoothing=...)`` on ``device``."""
    weight = class_weights(labels, num_classes).to(device) if weighted else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def _per_sample_ce(logits: torch.Tensor, labels: torch.Tensor, criterion: nn.Module | None) -> torch.Tensor:
    """Per-sample CE with the weight and label smoothing of ``criterion`` (plain CE otherwise)."""
    weight = getattr(criterion, "weight", None) if criterion is not None else None
    smoothing = float(getattr(criterion, "label_smoothing", 0.0)) if criterion is not None else 0.0
    if weight is not None:
        weight = weight.to(device=logits.device, dtype=logits.dtype)
    return nn.functional.cross_entropy(logits, labels, weight=weight, label_smoothing=smoothing, reduction="none")


class AuxiliaryLoss(nn.Module):
    """Full-coverage cross-entropy on the aux head (SelectiveNet's auxiliary classifier).

    It keeps the shared trunk learning from every sample while the selective terms concentrate
    on the accepted ones. ``weight`` and ``label_smoothing`` are those of ``nn.CrossEntropyLoss``.
    """

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.label_smoothing = float(label_smoothing)

    def forward(self, output, labels: torch.Tensor) -> torch.Tensor:
        aux = output.aux.float()
        weight = None if self.weight is None else self.weight.to(aux.device)
        return nn.functional.cross_entropy(aux, labels.long(), weight=weight, label_smoothing=self.label_smoothing)


class SelectiveLoss(nn.Module):
    """Gate objective without a target coverage: maximise soft coverage under a soft FNR cap.

    ``forward(output, labels, cls_loss_per_sample=None)`` takes a ``HeadOutput`` and returns a
    dict of tensors: ``objective`` (L_sel above), ``total`` (objective + ``aux_weight`` x aux CE;
    the SelectiveNet-style loss of the gate and aux heads on their own), and the components
    ``selective_risk``, ``coverage``, ``fnr_soft``, ``fnr_penalty``, ``gate_correct`` (the BCE of
    the gate against "correct", before ``correct_weight``), ``aux`` and ``multiplier``.
    ``cls_loss_per_sample`` [B] replaces the plain per-sample CE in the selective risk (e.g. the
    class-weighted, label-smoothed CE). See the comment above for the exact form.
    """

    def __init__(
        self,
        target_fnr: float = 0.02,
        coverage_weight: float = 1.0,
        fnr_penalty: float = 100.0,
        aux_weight: float = 0.5,
        risk_weight: float = 1.0,
        miss_temperature: float = 0.0,
        correct_weight: float = 0.0,
        detach_miss: bool = True,
        dual_lr: float | None = None,
        dual_init: float = 0.0,
        dual_max: float = 1e4,
        aux: "AuxiliaryLoss | None" = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not 0.0 < target_fnr < 1.0:
            raise ValueError(f"target_fnr must lie in (0, 1), got {target_fnr!r}")
        for name, value in (
            ("coverage_weight", coverage_weight), ("fnr_penalty", fnr_penalty), ("aux_weight", aux_weight),
            ("risk_weight", risk_weight), ("miss_temperature", miss_temperature), ("dual_init", dual_init),
            ("correct_weight", correct_weight),
        ):
            if not value >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if dual_lr is not None and not dual_lr > 0.0:
            raise ValueError(f"dual_lr must be > 0 or None, got {dual_lr!r}")
        self.target_fnr = float(target_fnr)
        self.coverage_weight = float(coverage_weight)
        self.fnr_penalty = float(fnr_penalty)
        self.aux_weight = float(aux_weight)
        self.risk_weight = float(risk_weight)
        self.miss_temperature = float(miss_temperature)
        self.correct_weight = float(correct_weight)
        self.detach_miss = bool(detach_miss)
        self.dual_lr = None if dual_lr is None else float(dual_lr)
        self.dual_max = float(dual_max)
        self.eps = float(eps)
        self.aux = aux if aux is not None else AuxiliaryLoss()
        self.register_buffer("multiplier", torch.tensor(float(dual_init)))

    def miss_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """Soft indicator that the class head predicts negative (see ``miss_temperature``)."""
        margin = logits[:, 0] - logits[:, 1]
        if self.miss_temperature == 0.0:
            miss = (margin > 0).to(logits.dtype)
        else:
            miss = torch.sigmoid(margin / self.miss_temperature)
        return miss.detach() if self.detach_miss else miss

    def forward(
        self, output, labels: torch.Tensor, cls_loss_per_sample: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = output.logits.float()
        labels = labels.long()
        gate_logit = output.gate.float().reshape(-1)
        g = torch.sigmoid(gate_logit)
        if g.shape[0] != labels.shape[0]:
            raise ValueError(f"gate has {g.shape[0]} entries, labels {labels.shape[0]}")
        if cls_loss_per_sample is None:
            cls_loss_per_sample = nn.functional.cross_entropy(logits, labels, reduction="none")
        coverage = g.mean()
        selective_risk = (cls_loss_per_sample.float() * g).mean() / (coverage + self.eps)
        positive = (labels == 1).to(g.dtype)
        accepted_positives = (g * positive).sum()
        fnr_soft = (g * positive * self.miss_probability(logits)).sum() / (accepted_positives + self.eps)
        excess = fnr_soft - self.target_fnr
        penalty = self.fnr_penalty * torch.relu(excess) ** 2
        multiplier = self.multiplier.detach().clone()
        if self.dual_lr is not None:
            penalty = penalty + multiplier * excess
            if self.training:
                with torch.no_grad():
                    updated = self.multiplier + self.dual_lr * excess.detach()
                    self.multiplier.copy_(updated.clamp(0.0, self.dual_max))
        correct = (logits.argmax(1) == labels).to(gate_logit.dtype)
        gate_correct = nn.functional.binary_cross_entropy_with_logits(gate_logit, correct)
        objective = self.risk_weight * selective_risk - self.coverage_weight * coverage + penalty
        if self.correct_weight:
            objective = objective + self.correct_weight * gate_correct
        aux = self.aux(output, labels)
        return {
            "total": objective + self.aux_weight * aux,
            "objective": objective,
            "selective_risk": selective_risk,
            "coverage": coverage,
            "fnr_soft": fnr_soft,
            "fnr_penalty": penalty,
            "gate_correct": gate_correct,
            "aux": aux,
            "multiplier": multiplier,
        }


class GateHeadLoss(nn.Module):
    """Loss of the gated head: ``CE(cls) + gate_loss_weight * L_sel + aux_weight * CE(aux)``.

    Callable as ``loss(output, labels) -> scalar`` (the trainer's ``loss_fn``). ``cls_criterion``
    is the class-weighted CE of :func:`build_criterion`; its weight and label smoothing are also
    used for the per-sample losses of the selective risk. ``L_sel`` is ``selective(...)["objective"]``
    (without the selective loss's own aux term; ``aux`` is weighted here by ``aux_weight``). The
    components of the latest call are available as ``last_components`` (floats, for logging; read
    them when needed - converting forces a device sync).
    """

    def __init__(
        self,
        cls_criterion: nn.Module,
        selective: SelectiveLoss,
        aux: AuxiliaryLoss | None = None,
        *,
        gate_loss_weight: float,
        aux_weight: float,
    ) -> None:
        super().__init__()
        if gate_loss_weight < 0 or aux_weight < 0:
            raise ValueError(f"gate_loss_weight and aux_weight must be >= 0, got {gate_loss_weight!r}, {aux_weight!r}")
        self.cls_criterion = cls_criterion
        self.selective = selective
        if aux is None:
            weight = getattr(cls_criterion, "weight", None)
            aux = AuxiliaryLoss(weight, float(getattr(cls_criterion, "label_smoothing", 0.0)))
        self.aux = aux
        self.gate_loss_weight = float(gate_loss_weight)
        self.aux_weight = float(aux_weight)
        self._last: dict[str, torch.Tensor] = {}

    @property
    def last_components(self) -> dict[str, float]:
        """The terms of the latest ``forward`` call as floats (empty before the first call)."""
        return {k: float(v) for k, v in self._last.items()}

    def components(self, output, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every term as a tensor: ``total``, ``cls``, ``selective`` (L_sel), ``aux`` and L_sel's parts."""
        labels = labels.long()
        logits = output.logits.float()
        cls = self.cls_criterion(logits, labels)
        per_sample = _per_sample_ce(logits, labels, self.cls_criterion)
        sel = self.selective(output, labels, cls_loss_per_sample=per_sample)
        aux = self.aux(output, labels)
        total = cls + self.gate_loss_weight * sel["objective"] + self.aux_weight * aux
        parts = {k: v for k, v in sel.items() if k not in ("total", "objective", "aux")}
        return {"total": total, "cls": cls, "selective": sel["objective"], "aux": aux, **parts}

    def forward(self, output, labels: torch.Tensor) -> torch.Tensor:
        parts = self.components(output, labels)
        self._last = {k: v.detach() for k, v in parts.items()}
        return parts["total"]
