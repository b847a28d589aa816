"""``coap-bench llama`` on several processes (DDP or FSDP2), and per-layer updates during backward.

Distributed runs are started by ``torchrun``::

    torchrun --nproc-per-node 2 -m coap_bench.cli llama --distributed fsdp2 --preset micro --steps 20

The launch, the training loop of a rank, the collective counts, the checkpoints and the per-rank
table are those of :mod:`coap_bench.distributed`, which ``coap-bench ddpm --distributed`` shares.
Every rank builds the same model (:func:`~coap_bench.llama_model.build_llama`, same seed),
wraps it (``DistributedDataParallel``, or ``fully_shard`` on each decoder layer and on the root)
and trains on its slice of each global batch: the global batch is ``--batch-size`` sequences, the
same batches a single-process run draws, split evenly across ranks. Runs stay in the ranks'
processes (no per-run subprocess). Backend and device follow ``--device``: gloo on the CPU,
NCCL and ``cuda:LOCAL_RANK`` on GPUs.

Each rank measures its optimizer-state bytes (a DTensor state counts by its local shard), the
optimizer's own collectives (``optimizer.communication`` of a COAP optimizer; other optimizers
keep no such log and show ``n/a``) and the collectives the engine issues during one step's
forward and backward. Rank 0 gathers the figures, evaluates the held-out loss on the full model and prints
the table.

Collective bytes are *payloads*: the size of each collective's full tensor (the output of an
all-gather, the input of a reduce-scatter, the buffer of an all-reduce), as
:class:`~coap_torch.optim.CommunicationLog` counts the optimizer's all-reduces. What a rank
actually sends is a fraction of that: ``(W - 1) / W`` for all-gather and reduce-scatter, twice
that for a ring all-reduce.

With ``--checkpoint-dir DIR``, each run saves everything every ``--checkpoint-every`` steps to
``DIR/<optimizer>/`` with ``torch.distributed.checkpoint`` (:class:`DistributedCheckpoint`: the
model and optimizer state dicts, each rank its shards under FSDP2, plus every rank's RNG, batch
stream, scheduler and logs; ``latest.json``, written by rank 0 last, names the complete
checkpoint) and continues from there when the job is started again with the same options and
number of ranks, ending with the numbers of a job that never stopped. ``DIR`` must be a folder
every rank sees (one machine, or a shared file system).

``--per-layer`` updates each parameter during backward (:func:`~coap_torch.optim.enable_per_layer_updates`)
in single-process and FSDP2 runs, and :func:`measure_per_layer_saving` measures what it saves: the
peak of allocated tensor bytes of a few training steps with and without it.
"""

from ..distributed import CollectiveBytes, DistributedCheckpoint, EngineCollectives
from .launch import ENGINES, launch_environment
from .per_layer import measure_per_layer_saving
from .report import format_distributed_table, format_per_layer_saving
from .training import run_llama_distributed, train_distributed

__all__ = [
    "ENGINES",
    "CollectiveBytes",
    "DistributedCheckpoint",
    "EngineCollectives",
    "format_distributed_table",
    "format_per_layer_saving",
    "launch_environment",
    "measure_per_layer_saving",
    "run_llama_distributed",
    "train_distributed",
]
