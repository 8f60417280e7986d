"""Backbone (frozen DINOv3, CLS features) and the Stage-1 head."""

from stage1_core.model.backbone import (
    BUILTIN_PREFIX,
    TINY_DINOV3,
    BackboneError,
    DINOv3Backbone,
    ensure_builtin_backbone,
    fingerprint_model,
    resolve_backbone,
)
from stage1_core.model.head import (
    HEAD_WIDTH,
    HeadOutput,
    HeadStateError,
    Stage1Head,
    count_parameters,
    head_logits,
    load_head_state_dict,
    maybe_compile,
    unwrap,
)

__all__ = [
    "BUILTIN_PREFIX",
    "TINY_DINOV3",
    "BackboneError",
    "DINOv3Backbone",
    "ensure_builtin_backbone",
    "fingerprint_model",
    "resolve_backbone",
    "HEAD_WIDTH",
    "HeadOutput",
    "HeadStateError",
    "Stage1Head",
    "count_parameters",
    "head_logits",
    "load_head_state_dict",
    "maybe_compile",
    "unwrap",
]
