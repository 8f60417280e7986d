"""Multi-process extraction and training on ``torch.distributed`` (jobs started by ``torchrun``).

:mod:`~stage1_core.distributed.env` says who this process is and wraps the few collectives the
library uses (no-ops without a process group); :mod:`~stage1_core.distributed.extract` shards
feature extraction; :mod:`~stage1_core.distributed.ddp` holds what training needs under
DistributedDataParallel; :mod:`~stage1_core.distributed.steps` runs a pipeline step on every rank
of a job. Nothing here imports Dagster: the Pipes entry point is :mod:`stage1_pipes.child`.
"""

from stage1_core.distributed import env

__all__ = ["env"]
