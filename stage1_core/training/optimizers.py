"""Optimisers: AdamW, SAM and Friendly-SAM, layer-wise learning-rate decay, and a factory.

AdamW
    ``AdamW(betas=(0.9, 0.999), eps=1e-8)`` with separate head / backbone groups
    (:func:`param_groups`, :func:`build_adamw`), the baseline's settings.

SAM (Foret et al., ICLR 2021; reference code davda54/sam)
    Sharpness-aware minimisation looks for parameters whose whole neighbourhood has low loss.
    :class:`SAM` wraps an already-built base optimiser (AdamW here) that owns the same parameter
    groups and turns one update into two passes:

    1. ``first_step``: with the gradient ``g`` at ``w``, move to ``w + e`` with
       ``e = rho * g / ||g||`` (``||.||`` is the L2 norm over all parameters that have a
       gradient). The adaptive variant (ASAM, Kwon et al., 2021) measures the step relative to
       the weights: ``e = rho * w**2 * g / ||w * g||`` (it needs a larger ``rho``, ~2).
    2. ``second_step``: compute the gradient at ``w + e`` (the caller runs forward/backward),
       restore ``w`` exactly and let the base optimiser step with that gradient.

    ``rho`` is a group option (default 0.05), so groups may use different radii.

Friendly-SAM (Li et al., CVPR 2024; reference code nblt/F-SAM)
    The full gradient contains a component shared by the whole data set that works against
    generalisation when used as the adversarial direction. :class:`FriendlySAM` removes an
    exponential moving average of past gradients from it: on the first call it is plain SAM and
    sets ``m_1 = g_1``; afterwards ``d_t = g_t - sigma * m_{t-1}``, then
    ``m_t = lmbda * m_{t-1} + (1 - lmbda) * g_t`` with the clean gradient ``g_t``, and
    ``e = rho * d_t / ||d_t||`` (adaptive: ``rho * w**2 * d_t / ||w * d_t||``). Defaults
    ``rho=0.05, sigma=1, lmbda=0.9``; the paper's scripts also use ``rho`` 0.1-0.2,
    ``lmbda`` 0.95.

Gradient accumulation and mixed precision
    :func:`sam_accumulated_step` runs one SAM / F-SAM update over several micro-batches: clean
    gradients accumulated over all of them, one ``first_step``, perturbed gradients accumulated
    over the same micro-batches at the single point ``w + e``, one ``second_step``. With equal
    micro-batch sizes this is the update of the concatenated batch.

Layer-wise learning-rate decay
    :func:`layerwise_param_groups` gives transformer block ``i`` of ``L`` the learning rate
    ``base_lr * decay ** (L - 1 - i)``; the embeddings count as block ``-1``
    (``base_lr * decay ** L``) and everything else (final norm, head) keeps ``base_lr``.

Pitfalls of the reference implementations that this module avoids
    - ``p.grad.clone()`` without a ``None`` check crashes on parameters that received no
      gradient; here they are skipped everywhere (not perturbed, not restored, not stepped).
    - Restoring "parameters that have a gradient now" leaves a parameter perturbed when it had a
      gradient at ``w`` but none at ``w + e``; here exactly the perturbed parameters are restored,
      by copying the saved ``w`` (bit-exact, no ``w + e - e`` round-off).
    - The wrapper's ``state_dict`` holds only the wrapper's own state, so a checkpoint loses the
      base optimiser's moments; here it holds the base optimiser's state, the F-SAM momentum and
      the step counter, and loading re-shares the parameter groups with the base optimiser
      (``Optimizer.load_state_dict`` replaces the group dicts, which would otherwise leave LR
      schedules changing groups the base optimiser no longer reads).
    - F-SAM's reference code overwrites ``p.grad`` with ``d``; here the gradient is left intact,
      and a zero gradient (norm 0) gives ``e = 0`` rather than NaN (``eps`` in the denominator).
    - The reference accumulation script perturbs and un-perturbs per micro-batch without
      restoring the weights in between; see :func:`sam_accumulated_step` for the sound order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import AdamW, Optimizer

ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8
SAM_EPS = 1e-12


def param_groups(
    head: nn.Module,
    backbone: nn.Module | None,
    lr_head: float,
    lr_backbone: float,
    weight_decay: float,
) -> list[dict]:
    """One group ``"head"`` (lr_head) and, when the backbone has trainable parameters, ``"backbone"``.

    A frozen backbone contributes no group, so the optimizer state of a phase-1 run only holds
    the head; group order is fixed (head first) so ``param_groups[0]["lr"]`` is the head's LR.
    """
    head_params = [p for p in head.parameters() if p.requires_grad]
    if not head_params:
        raise ValueError("the head has no trainable parameters")
    groups = [{"params": head_params, "lr": lr_head, "weight_decay": weight_decay, "name": "head"}]
    if backbone is not None:
        seen = {id(p) for p in head_params}
        backbone_params = [p for p in backbone.parameters() if p.requires_grad and id(p) not in seen]
        if backbone_params:
            groups.append({"params": backbone_params, "lr": lr_backbone, "weight_decay": weight_decay, "name": "backbone"})
    return groups


def _fused_ok(groups: Sequence[dict]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return {p.device.type for p in params} <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


def _adamw(groups: list[dict], lr: float, weight_decay: float) -> AdamW:
    return AdamW(
        groups,
        lr=lr,
        betas=ADAMW_BETAS,
        eps=ADAMW_EPS,
        weight_decay=weight_decay,
        fused=True if _fused_ok(groups) else None,
    )


def build_adamw(
    head: nn.Module,
    backbone: nn.Module | None = None,
    *,
    lr_head: float,
    lr_backbone: float,
    weight_decay: float,
) -> AdamW:
    """``AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay)`` over :func:`param_groups`.

    The fused kernel (one call for all tensors; same update rule) is used when every parameter
    lives on a device torch has it for (CPU and CUDA); otherwise the default implementation.
    """
    return _adamw(param_groups(head, backbone, lr_head, lr_backbone, weight_decay), lr_head, weight_decay)


def _flat_param_ids(params: Any) -> list[int]:
    ids = []
    for item in params:
        if isinstance(item, dict):
            group = item["params"]
            ids.extend(id(p) for p in ([group] if isinstance(group, torch.Tensor) else group))
        else:
            ids.append(id(item))
    return ids


def _global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of the concatenation of ``tensors`` (at least float32), on the first one's device."""
    if not tensors:
        return torch.zeros(())
    device = tensors[0].device
    norms = []
    for t in tensors:
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        norms.append(torch.linalg.vector_norm(t).to(device))
    dtype = norms[0].dtype
    for n in norms[1:]:
        dtype = torch.promote_types(dtype, n.dtype)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))


class SAM(Optimizer):
    """Sharpness-aware minimisation around an already-built base optimiser.

    ``params`` must be the parameters the base optimiser owns (they are only checked); the
    wrapper shares ``base_optimizer.param_groups``, so LR schedules, per-group learning rates and
    weight decay act on both. ``rho`` and ``adaptive`` become group options.

    Usage: ``loss(w).backward(); opt.first_step(); loss(w + e).backward(); opt.second_step()``,
    or ``opt.step(closure)`` where ``closure`` runs forward and backward and returns the loss.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        base_optimizer: Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        **defaults: Any,
    ) -> None:
        if isinstance(base_optimizer, type) or not isinstance(base_optimizer, Optimizer):
            raise TypeError("base_optimizer must be an optimizer instance built over the same parameters")
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        base_ids = _flat_param_ids(base_optimizer.param_groups)
        if params is not None and sorted(_flat_param_ids(params)) != sorted(base_ids):
            raise ValueError("params must be exactly the parameters the base optimizer owns")
        self._ready = False
        super().__init__(base_optimizer.param_groups, dict(rho=rho, adaptive=adaptive, **defaults))
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.defaults = {**base_optimizer.defaults, **self.defaults}
        self.num_steps = 0
        self._perturbed: list[torch.Tensor] = []
        self._ready = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self._ready:
            super().add_param_group(param_group)
            return
        self.base_optimizer.add_param_group(param_group)
        for key in ("rho", "adaptive", "sigma", "lmbda"):
            if key in self.defaults:
                param_group.setdefault(key, self.defaults[key])

    @property
    def is_perturbed(self) -> bool:
        """True between :meth:`first_step` and :meth:`second_step` / :meth:`restore`."""
        return bool(self._perturbed)

    def _ascent_directions(self) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
        """``(group, param, direction)`` for every parameter with a gradient; SAM: the gradient."""
        return [(g, p, p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """Save ``w`` and move to ``w + e`` (parameters without a gradient stay where they are)."""
        if self._perturbed:
            raise RuntimeError("first_step() called twice without second_step() or restore()")
        directions = self._ascent_directions()
        if not directions:
            return
        norm = _global_norm([(p.abs() * d) if g["adaptive"] else d for g, p, d in directions])
        for group, p, d in directions:
            state = self.state[p]
            saved = state.get("old_p")
            if saved is None or saved.shape != p.shape or saved.dtype != p.dtype or saved.device != p.device:
                state["old_p"] = p.detach().clone()
            else:
                saved.copy_(p)
            scale = (group["rho"] / (norm + SAM_EPS)).to(device=p.device, dtype=p.dtype)
            e = d * scale
            if group["adaptive"]:
                e = e * p.square()
            p.add_(e)
            self._perturbed.append(p)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def restore(self) -> None:
        """Move every perturbed parameter back to its saved ``w`` without an update."""
        for p in self._perturbed:
            p.copy_(self.state[p]["old_p"])
        self._perturbed = []

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True) -> None:
        """Restore ``w`` and step the base optimiser with the gradient computed at ``w + e``."""
        self.restore()
        self.base_optimizer.step()
        self.num_steps += 1
        # LR schedulers detect "optimizer.step() was called" through this flag; second_step is
        # this optimiser's update, so schedules attached to it must not warn.
        self._opt_called = True
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """Full update: ``closure`` (zero grads, forward, backward, return loss) runs at ``w`` and ``w + e``.

        Unlike davda54/sam the first forward/backward is run here too; returns the loss at ``w``.
        """
        if closure is None:
            raise ValueError("SAM.step needs a closure that runs forward and backward and returns the loss")
        closure = torch.enable_grad()(closure)
        self.zero_grad(set_to_none=True)
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step(zero_grad=False)
        return loss

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """Base optimiser state + wrapper state (step counter, F-SAM momentum); not mid-step."""
        if self._perturbed:
            raise RuntimeError("state_dict() between first_step() and second_step(): the weights are perturbed")
        return {
            "optimizer": type(self).__name__,
            "base_optimizer": self.base_optimizer.state_dict(),
            "num_steps": self.num_steps,
            **self._extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; raises ``ValueError`` for a state of another optimiser."""
        if not isinstance(state_dict, dict) or "base_optimizer" not in state_dict:
            raise ValueError(f"not a {type(self).__name__} state dict (no 'base_optimizer' entry)")
        kind = state_dict.get("optimizer")
        if kind != type(self).__name__:
            raise ValueError(f"state dict was written by {kind!r}, this optimiser is {type(self).__name__!r}")
        if self._perturbed:
            raise RuntimeError("load_state_dict() between first_step() and second_step()")
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.param_groups = self.base_optimizer.param_groups
        self.num_steps = int(state_dict["num_steps"])
        self._load_extra_state(state_dict)


class FriendlySAM(SAM):
    """F-SAM: the ascent direction is the gradient minus ``sigma`` times its moving average.

    ``m`` is per parameter and starts as the first gradient the parameter receives (that step is
    plain SAM for it); parameters without a gradient keep their momentum unchanged.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        base_optimizer: Optimizer,
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        adaptive: bool = False,
    ) -> None:
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, sigma=sigma, lmbda=lmbda)

    @torch.no_grad()
    def _ascent_directions(self) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
        out = []
        for group, p, g in super()._ascent_directions():
            state = self.state[p]
            m = state.get("momentum")
            if m is None:
                state["momentum"] = g.detach().clone()
                d = g
            else:
                d = torch.sub(g, m, alpha=group["sigma"])
                m.mul_(group["lmbda"]).add_(g, alpha=1.0 - group["lmbda"])
            out.append((group, p, d))
        return out

    def _extra_state(self) -> dict[str, Any]:
        momentum = {}
        for index, p in enumerate(self._params()):
            m = self.state[p].get("momentum") if p in self.state else None
            if m is not None:
                momentum[index] = m.detach().clone()
        return {"momentum": momentum}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        params = self._params()
        momentum = extra.get("momentum")
        if not isinstance(momentum, dict):
            raise ValueError("FriendlySAM state dict has no 'momentum' entry")
        for index, m in momentum.items():
            index = int(index)
            if not 0 <= index < len(params) or params[index].shape != m.shape:
                raise ValueError(f"F-SAM momentum {index} does not fit this model")
        for p in params:
            if p in self.state:
                self.state[p].pop("momentum", None)
        for index, m in momentum.items():
            p = params[int(index)]
            self.state[p]["momentum"] = m.to(device=p.device, dtype=p.dtype).clone()


_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|blocks)\.(\d+)(?:\.|$)")
_EMBEDDING_PARTS = frozenset(
    {"embeddings", "patch_embed", "pos_embed", "cls_token", "reg_token", "register_tokens", "mask_token"}
)


def default_layer_of(name: str) -> int | None:
    """Block index from ``...layer.{i}...`` (also ``layers.{i}`` / ``blocks.{i}``); ``-1`` for embeddings.

    ``model.layer.3.attention.q_proj.lora_A.default.weight`` -> 3,
    ``embeddings.patch_embeddings.weight`` -> -1, ``norm.weight`` / head parameters -> None.
    """
    match = _LAYER_RE.search(name)
    if match:
        return int(match.group(1))
    if _EMBEDDING_PARTS.intersection(name.split(".")):
        return -1
    return None


def layerwise_param_groups(
    named_params: Iterable[tuple[str, torch.Tensor]],
    base_lr: float,
    layer_lr_decay: float,
    num_layers: int,
    weight_decay: float,
    layer_of: Callable[[str], int | None] | None = None,
) -> list[dict]:
    """Parameter groups with layer-wise learning-rate decay (trainable parameters only).

    Block ``i`` (0-based, ``layer_of(name) == i``) gets ``base_lr * layer_lr_decay ** (num_layers
    - 1 - i)``, so the last block trains at ``base_lr``; ``layer_of(name) == -1`` (embeddings)
    gets ``base_lr * layer_lr_decay ** num_layers``; ``None`` (final norm, head, anything else)
    gets ``base_lr``. ``layer_of`` defaults to :func:`default_layer_of`. Groups are named
    ``"embeddings"``, ``"layer_{i}"``, ``"other"`` (in that order, empty ones dropped); with
    ``layer_lr_decay == 1`` there is a single group ``"all"``. Every group uses ``weight_decay``
    (biases and norms are not exempted). Build the head's group separately (e.g. with
    :func:`param_groups`) when it needs its own learning rate.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if layer_lr_decay <= 0:
        raise ValueError(f"layer_lr_decay must be > 0, got {layer_lr_decay}")
    layer_of = layer_of or default_layer_of
    named = [(n, p) for n, p in named_params if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters")
    if layer_lr_decay == 1.0:
        return [{"params": [p for _, p in named], "lr": base_lr, "weight_decay": weight_decay, "name": "all"}]
    buckets: dict[int | None, list[torch.Tensor]] = {}
    for name, p in named:
        layer = layer_of(name)
        if layer is not None and not -1 <= layer < num_layers:
            raise ValueError(f"{name}: layer {layer} outside [-1, {num_layers})")
        buckets.setdefault(layer, []).append(p)
    groups = []
    for layer in sorted(k for k in buckets if k is not None):
        groups.append(
            {
                "params": buckets[layer],
                "lr": base_lr * layer_lr_decay ** (num_layers - 1 - layer),
                "weight_decay": weight_decay,
                "name": "embeddings" if layer == -1 else f"layer_{layer}",
            }
        )
    if None in buckets:
        groups.append({"params": buckets[None], "lr": base_lr, "weight_decay": weight_decay, "name": "other"})
    return groups


def _build_adamw_only(groups: list[dict], *, lr: float, weight_decay: float, **_: Any) -> Optimizer:
    return _adamw(groups, lr, weight_decay)


def _build_sam(
    groups: list[dict], *, lr: float, weight_decay: float, rho: float, adaptive: bool, **_: Any
) -> Optimizer:
    base = _adamw(groups, lr, weight_decay)
    return SAM(base.param_groups, base, rho=rho, adaptive=adaptive)


def _build_fsam(
    groups: list[dict],
    *,
    lr: float,
    weight_decay: float,
    rho: float,
    sigma: float,
    lmbda: float,
    adaptive: bool,
    **_: Any,
) -> Optimizer:
    base = _adamw(groups, lr, weight_decay)
    return FriendlySAM(base.param_groups, base, rho=rho, sigma=sigma, lmbda=lmbda, adaptive=adaptive)


OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "adamw": _build_adamw_only,
    "sam": _build_sam,
    "fsam": _build_fsam,
}


def build_optimizer(
    name: str,
    param_groups: list[dict],
    *,
    lr: float,
    weight_decay: float,
    rho: float = 0.05,
    sigma: float = 1.0,
    lmbda: float = 0.9,
    adaptive: bool = False,
) -> Optimizer:
    """``"adamw"`` | ``"sam"`` | ``"fsam"`` over ``param_groups``; the base is always AdamW (0.9, 0.999), 1e-8.

    ``lr`` / ``weight_decay`` are defaults for groups without their own. The group dicts are
    copied, so the caller's list is not modified. SAM / F-SAM options are ignored for AdamW.
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    groups = [dict(g) for g in param_groups]
    return OPTIMIZERS[key](
        groups, lr=lr, weight_decay=weight_decay, rho=rho, sigma=sigma, lmbda=lmbda, adaptive=adaptive
    )


def build_training_optimizer(config: Any, head: nn.Module, backbone: nn.Module | None = None) -> Optimizer:
    """The optimiser a training config asks for (``config.optimizer``: adamw | sam | fsam).

    The head trains at ``lr_head``; the backbone's trainable parameters (adapters, when a phase
    fine-tunes it) at ``lr_backbone``, decayed per block by ``layer_lr_decay`` (1.0 = one group).
    SAM / F-SAM wrap AdamW with ``sam_rho``, ``fsam_sigma``, ``fsam_lmbda``, ``sam_adaptive``.
    Without a trainable backbone and with ``adamw`` this is exactly :func:`build_adamw`.
    """
    lr_head, lr_backbone = float(config.lr_head), float(config.lr_backbone)
    weight_decay = float(config.weight_decay)
    groups = param_groups(head, None, lr_head, lr_backbone, weight_decay)
    if backbone is not None:
        named = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
        if named:
            from stage1_core.model.peft import num_blocks

            decay = float(getattr(config, "layer_lr_decay", 1.0))
            for group in layerwise_param_groups(named, lr_backbone, decay, num_blocks(backbone), weight_decay):
                groups.append({**group, "name": f"backbone_{group['name']}"})
    return build_optimizer(
        str(getattr(config, "optimizer", "adamw")), groups, lr=lr_head, weight_decay=weight_decay,
        rho=float(getattr(config, "sam_rho", 0.05)), sigma=float(getattr(config, "fsam_sigma", 1.0)),
        lmbda=float(getattr(config, "fsam_lmbda", 0.9)), adaptive=bool(getattr(config, "sam_adaptive", False)),
    )


def _grads(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _norm_or_clip(params: Sequence[torch.Tensor], max_grad_norm: float | None) -> torch.Tensor:
    if max_grad_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    return _global_norm(_grads(params))


def _accumulate(
    compute_loss: Callable[[Any], torch.Tensor], micro_batches: Sequence, scaler: Any
) -> torch.Tensor:
    total = None
    for batch in micro_batches:
        loss = compute_loss(batch) / len(micro_batches)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def sam_accumulated_step(
    optimizer: SAM,
    compute_loss: Callable[[Any], torch.Tensor],
    micro_batches: Sequence,
    *,
    scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float | None = None,
    params: Iterable[torch.Tensor] | None = None,
) -> tuple[float, float]:
    """One SAM / F-SAM update over ``micro_batches``; returns (clean loss, clean gradient norm).

    ``compute_loss(batch)`` runs the forward pass (under autocast if wanted) and returns the mean
    loss of one micro-batch; it is called twice per micro-batch, at ``w`` and at ``w + e``
    (dropout masks and batch-norm statistics see two forward passes). Each loss is divided by
    ``len(micro_batches)``, so equal-sized micro-batches reproduce the concatenated batch.

    Order: zero grads; clean gradients over all micro-batches; unscale; norm (and clip to
    ``max_grad_norm``) over ``params`` (default: all optimised parameters); ``first_step``;
    perturbed gradients over the same micro-batches; unscale; clip; ``second_step``. Clipping the
    clean gradient does not change SAM's normalised perturbation, but F-SAM's momentum then
    averages clipped gradients.

    With a ``GradScaler`` (fp16) the clean gradients are unscaled through
    ``scaler.unscale_(optimizer.base_optimizer)`` and the perturbed ones through
    ``scaler.unscale_(optimizer)`` (the scaler keys its bookkeeping by optimiser object, and both
    share the parameter groups), so ``scaler.update()`` sees overflows of either pass. A
    non-finite clean gradient skips the update (no perturbation, F-SAM momentum unchanged); a
    non-finite perturbed gradient restores ``w`` and skips the base step (the F-SAM momentum has
    already absorbed the finite clean gradient); both call ``scaler.update()``, which lowers the
    scale. The returned norm is then the offending non-finite one. bf16 autocast needs no scaler; without a scaler
    nothing is skipped. Gradients are zeroed on return.
    """
    if not isinstance(optimizer, SAM):
        raise TypeError("sam_accumulated_step needs a SAM / FriendlySAM optimizer")
    if len(micro_batches) == 0:
        raise ValueError("no micro-batches")
    params = list(params) if params is not None else optimizer._params()
    optimizer.zero_grad(set_to_none=True)
    loss = _accumulate(compute_loss, micro_batches, scaler)
    if scaler is not None:
        scaler.unscale_(optimizer.base_optimizer)
    grad_norm = _norm_or_clip(params, max_grad_norm)
    if scaler is not None and scaler.is_enabled() and not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        scaler.update()
        return float(loss), float(grad_norm)
    optimizer.first_step(zero_grad=True)
    _accumulate(compute_loss, micro_batches, scaler)
    if scaler is not None:
        scaler.unscale_(optimizer)
    perturbed_norm = _norm_or_clip(params, max_grad_norm)
    if scaler is not None and scaler.is_enabled() and not torch.isfinite(perturbed_norm):
        optimizer.restore()
        optimizer.zero_grad(set_to_none=True)
        scaler.update()
        return float(loss), float(perturbed_norm)
    optimizer.second_step(zero_grad=True)
    if scaler is not None:
        scaler.update()
    return float(loss), float(grad_norm)
