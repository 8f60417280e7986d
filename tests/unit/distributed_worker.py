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

    def __init__(self, n: int, seed: int = 0, prefix: str = "img", size: int = 32) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.labels = [int(x) for x in (torch.arange(n) % 3 != 0).long()]
        self.sample_ids = [f"{prefix}_{i:03d}.jpg" for i in range(n)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        kill = os.environ.get(KILL_ENV)
        if kill:
            rank, row = (int(v) for v in kill.split(":"))
            if rank == int(os.environ.get("RANK", "0")) and row == index:
                os.kill(os.getpid(), signal.SIGKILL)
        return self.images[index], self.labels[index]


def datasets() -> dict[str, Dataset]:
    return {"train": Images(22), "val": Images(9, seed=1, prefix="v")}


def extract(args: dict) -> None:
    from stage1_core.features import extract_split_features
    from stage1_core.model.backbone import DINOv3Backbone

    backbone = DINOv3Backbone.load(args["backbone"])
    passes = []
    for _ in range(args.get("repeat", 1)):  # a repeat must find the store complete
        manifest = extract_split_features(backbone, datasets(), args["out"], "test-transform", batch_size=4,
                                          device="cpu", progress=False, num_workers=0)
        passes.append(manifest.forward_passes)
    Path(args["out"], f"passes.rank{os.environ['RANK']}.json").write_text(json.dumps(passes))


SCENARIOS = {"extract": extract}


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
