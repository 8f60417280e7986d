"""AdamW with the baseline's settings and separate head / backbone parameter groups."""

from __future__ import annotations

from torch import nn
from torch.optim import AdamW

ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8


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
    groups = param_groups(head, backbone, lr_head, lr_backbone, weight_decay)
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"} and all(p.is_floating_point() for g in groups for p in g["params"])
    return AdamW(
        groups, lr=lr_head, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=weight_decay, fused=True if fused else None
    )
