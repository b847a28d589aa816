"""What the jobs' ``--distributed ddp|fsdp2`` runs share (``coap-bench llama`` and ``coap-bench ddpm``).

A job started by ``torchrun`` runs in every rank's process: :func:`process_group` starts the
process group (gloo on the CPU, NCCL and ``cuda:LOCAL_RANK`` on GPUs) and destroys it at the
end; :func:`wrap_model` wraps the model in ``DistributedDataParallel``, or applies ``fully_shard``
(FSDP2, dim-0 sharding on a 1-D mesh) to the blocks the job names and then to the root. Each
rank trains on its share of every global batch in a :class:`DistributedLoop`, which logs the
optimizer's own collectives per step (``optimizer.communication`` of a COAP optimizer) and counts
the engine's collectives on the last step (:class:`EngineCollectives`);
:func:`train_every_optimizer` runs every optimizer and gathers the ranks' figures on rank 0, and
:func:`format_rank_table` prints them. :class:`DistributedCheckpoint` saves and resumes a run with
``torch.distributed.checkpoint``.
"""

from .checkpoint import DistributedCheckpoint
from .collectives import ENGINE_BYTES_METHOD, CollectiveBytes, EngineCollectives
from .launch import ENGINES, check_engine, launch_environment, process_group, start_process_group, wrap_model
from .report import format_rank_table
from .runs import (
    ENGINE_ESTIMATE_METHOD,
    PER_RANK,
    DistributedLoop,
    distributed_settings,
    engine_estimate_bytes,
    full_model_on_rank0,
    merge_ranks,
    train_every_optimizer,
)

__all__ = [
    "ENGINES",
    "ENGINE_BYTES_METHOD",
    "ENGINE_ESTIMATE_METHOD",
    "PER_RANK",
    "CollectiveBytes",
    "DistributedCheckpoint",
    "DistributedLoop",
    "EngineCollectives",
    "check_engine",
    "distributed_settings",
    "engine_estimate_bytes",
    "format_rank_table",
    "full_model_on_rank0",
    "launch_environment",
    "merge_ranks",
    "process_group",
    "start_process_group",
    "train_every_optimizer",
    "wrap_model",
]
