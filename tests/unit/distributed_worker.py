"""Worker of the torch.distributed tests, started by ``python -m torch.distributed.run`` (gloo, CPU).

``python -m torch.distributed.run --nproc-per-node N -m tests.unit.distributed_worker <scenario> <json args>``.
Each scenario is what one rank does; results go to files the test compares. ``STAGE1_TEST_KILL``
(``"<rank>:<row>"``) makes that rank SIGKILL itself when it loads that row, as a crash would.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

KILL_ENV = "STAGE1_TEST_KILL"


class Images(Dataset):
    """Seeded random images with ids and labels (the shape a LabelledImageDataset offers)."""

    def __init__(self, n: int, seed: int = 0, prefix: str = "img", size: int = 32, noise: float = 0.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.noise = noise
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.labels = [int(x) for x in (torch.arange(n) % 3 != 0).long()]
        self.sample_ids = [f"{prefix}_{i:03d}.jpg" for i in range(n)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if self.noise:  # drawn from the process's global RNG, like a random augmentation
            return self.images[index] + self.noise * torch.randn(self.images[index].shape), self.labels[index]
        kill = os.environ.get(KILL_ENV)
        if kill:
            rank, row = (int(v) for v in kill.split(":"))
            if rank == int(os.environ.get("RANK", "0")) and row == index:
                os.kill(os.getpid(), signal.SIGKILL)
        return self.images[index], self.labels[index]


def datasets() -> dict[str, Dataset]:
    return {"train": Images(22), "val": Images(9, seed=1, prefix="v")}


def extract(args: dict) -> None:
    from stage1_core.distributed.extract import extract_features
    from stage1_core.model.backbone import DINOv3Backbone

    backbone = DINOv3Backbone.load(args["backbone"])
    passes = []
    for _ in range(args.get("repeat", 1)):  # a repeat must find the store complete
        manifest = extract_features(backbone, datasets(), args["out"], "test-transform", batch_size=4,
                                    device="cpu", progress=False, num_workers=0)
        passes.append(manifest.forward_passes)
    Path(args["out"], f"passes.rank{os.environ['RANK']}.json").write_text(json.dumps(passes))


def train_config():
    from stage1_core.config import Stage1ProConfig

    return Stage1ProConfig(peft_type="lora", peft_r=2, peft_blocks=1, epochs=2, warmup_epochs=1, max_batch_size=8,
                           fallback_batch_size=8, grad_accum_steps=2, dropout=0.0, label_smoothing=0.0, class_weighting="none",
                           use_amp=False, num_workers=0, lr_head=1e-2, lr_backbone=1e-2, early_stop_patience=10,
                           seed=0)


def train_run(backbone_dir: str, out: Path, noise: float = 0.0, **kwargs):
    """``train_head`` on images with LoRA adapters; the global batch of 8 is shared by the ranks."""
    from stage1_core.data.loaders import make_dataloader
    from stage1_core.distributed import ddp, env
    from stage1_core.model.backbone import DINOv3Backbone
    from stage1_core.training.finetune import apply_peft
    from stage1_core.training.trainer import train_head

    cfg = train_config()
    torch.manual_seed(0)
    backbone = apply_peft(DINOv3Backbone.load(backbone_dir), cfg)
    train = Images(36, seed=2, noise=noise)  # 4 global batches of 8 per epoch (4 left over), 2 steps
    if env.active():
        loader = ddp.train_loader(train, cfg.max_batch_size, 0, "cpu", cfg.seed)
    else:
        loader = make_dataloader(train, cfg.max_batch_size, train=True, num_workers=0, seed=cfg.seed)
    val = make_dataloader(Images(10, seed=3), 8, train=False, num_workers=0)
    return train_head(cfg, loader, val, out, backbone=backbone, device="cpu", progress=False, **kwargs)


def cached_run(out: Path):
    """``train_head`` on cached features (the linear-probe stage), global batch 8, accumulation 2."""
    from stage1_core.features import TensorSplit
    from stage1_core.training.trainer import train_head

    g = torch.Generator().manual_seed(7)
    features = torch.randn(40, 16, generator=g)
    labels = (features[:, 0] > 0).long()
    train = TensorSplit(features[:32], labels[:32], None, "train")
    val = TensorSplit(features[32:], labels[32:], None, "val_select")
    return train_head(train_config(), train, val, out, device="cpu", progress=False)


def explora_run(backbone_dir: str, checkpoint: Path | None = None, stop_after: int | None = None):
    """ExPLoRA on 22 seeded images, global batch 8 (the last batch of 6 shared too), 2 epochs."""
    from torch.utils.data import TensorDataset

    from stage1_core.domain_adaptation.explora import ExPLoRAConfig, ExPLoRATrainer
    from stage1_core.model.backbone import DINOv3Backbone

    config = ExPLoRAConfig(unfrozen_blocks=1, lora_r=2, epochs=2, batch_size=8, decoder_dim=16, decoder_heads=2,
                           num_workers=0, progress=False, lr=1e-2, decoder_lr=1e-2)
    trainer = ExPLoRATrainer(DINOv3Backbone.load(backbone_dir), config, device="cpu")
    trainer.fit(TensorDataset(Images(22, seed=4).images), checkpoint_path=checkpoint, stop_after=stop_after)
    return trainer


def explora_weights(trainer) -> dict[str, torch.Tensor]:
    state = trainer.state_dict()
    return {**{f"backbone.{k}": v for k, v in state["backbone_trainable"].items()},
            **{f"decoder.{k}": v for k, v in state["decoder"].items()}}


def train(args: dict) -> None:
    from stage1_core.distributed import env

    out = Path(args["out"])
    cached_run(out / "cached")
    full = explora_weights(explora_run(args["explora_backbone"]))
    explora_run(args["explora_backbone"], out / "explora.pt", stop_after=1)
    resumed = explora_weights(explora_run(args["explora_backbone"], out / "explora.pt"))
    if env.is_main():
        torch.save({"full": full, "resumed": resumed}, out / "explora_weights.pt")
    train_run(args["backbone"], out / "plain")
    train_run(args["backbone"], out / "noisy_full", noise=0.5)
    train_run(args["backbone"], out / "noisy_resumed", noise=0.5, stop_after_epoch=1)
    train_run(args["backbone"], out / "noisy_resumed", noise=0.5,
              resume_checkpoint=out / "noisy_resumed" / "checkpoint_last.pth")


SCENARIOS = {"extract": extract, "train": train}


def main() -> None:
    from stage1_core.distributed import env

    torch.set_num_threads(1)  # the same thread count as the one-process reference
    env.init_from_env("cpu")
    try:
        SCENARIOS[sys.argv[1]](json.loads(sys.argv[2]))
    finally:
        env.shutdown()


if __name__ == "__main__":
    main()
