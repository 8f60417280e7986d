"""Phase-4 domain adaptation: ExPLoRA continued pre-training on unlabeled target-domain images."""

from stage1_core.domain_adaptation.data import (
    ForbiddenImageError,
    UnlabeledImageDataset,
    build_pretrain_eval_transform,
    build_pretrain_transform,
    split_held_out,
    unlabeled_images,
)
from stage1_core.domain_adaptation.explora import (
    ExPLoRAConfig,
    ExPLoRAError,
    ExPLoRATrainer,
    PixelDecoder,
    masked_patch_loss,
    patchify,
    plot_explora_losses,
    random_patch_mask,
    reconstruction_gain,
)

__all__ = [
    "ExPLoRAConfig",
    "ExPLoRAError",
    "ExPLoRATrainer",
    "ForbiddenImageError",
    "PixelDecoder",
    "UnlabeledImageDataset",
    "build_pretrain_eval_transform",
    "build_pretrain_transform",
    "masked_patch_loss",
    "patchify",
    "plot_explora_losses",
    "random_patch_mask",
    "reconstruction_gain",
    "split_held_out",
    "unlabeled_images",
]
