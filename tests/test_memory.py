"""``optimizer_state_nbytes`` / ``state_nbytes_by_kind``: one count per storage."""

from __future__ import annotations

import pytest
import torch

from coap_torch import CoapAdamW
from coap_torch.utils import optimizer_state_nbytes, state_nbytes_by_kind


def _optimizer(*states: dict) -> torch.optim.Optimizer:
    """An optimizer whose state is exactly ``states``, one dict per parameter, in order."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in states]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for param, state in zip(params, states):
        optimizer.state[param] = state
    return optimizer


def test_plain_tensors_hand_computed():
    optimizer = _optimizer(
        {"exp_avg": torch.zeros(3, 5), "exp_avg_sq": torch.zeros(3, 5, dtype=torch.float64)},
        {"codes": torch.zeros(7, dtype=torch.int8), "absmax": torch.zeros(2, dtype=torch.float16)},
    )
    assert optimizer_state_nbytes(optimizer) == 4 * 15 + 8 * 15 + 7 + 2 * 2
    assert state_nbytes_by_kind(optimizer) == {"exp_avg": 60, "exp_avg_sq": 120, "codes": 7, "absmax": 4}


def test_empty_state_and_non_tensor_values():
    assert optimizer_state_nbytes(torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)) == 0
    optimizer = _optimizer({"count": 3, "name": "x", "buf": torch.zeros(0)})
    assert optimizer_state_nbytes(optimizer) == 0
    assert state_nbytes_by_kind(optimizer) == {"count": 0, "name": 0, "buf": 0}


def test_two_views_of_one_storage_count_once():
    base = torch.zeros(4, 6)
    optimizer = _optimizer({"a": base, "b": base.view(6, 4)}, {"c": base.t(), "d": base[1]})
    assert optimizer_state_nbytes(optimizer) == 4 * 24
    # Attributed once, to the first key that reaches the storage.
    assert state_nbytes_by_kind(optimizer) == {"a": 96, "b": 0, "c": 0, "d": 0}


def test_narrow_slice_counts_the_whole_storage():
    big = torch.zeros(1000)
    optimizer = _optimizer({"exp_avg": big[10:12]})
    assert optimizer_state_nbytes(optimizer) == 4 * 1000
    assert state_nbytes_by_kind(optimizer) == {"exp_avg": 4000}
    # ... and once, even when the slice and the full tensor are both held.
    optimizer = _optimizer({"small": big[:2]}, {"full": big})
    assert optimizer_state_nbytes(optimizer) == 4000
    assert state_nbytes_by_kind(optimizer) == {"small": 4000, "full": 0}


def test_nested_containers():
    shared = torch.zeros(8)
    optimizer = _optimizer(
        {
            "factors": [torch.zeros(2, 3), (torch.zeros(5, dtype=torch.float64), shared)],
            "nested": {"x": torch.zeros(4, dtype=torch.int16), "y": [shared[2:4]], "z": {"w": (torch.zeros(1),)}},
        }
    )
    assert optimizer_state_nbytes(optimizer) == 4 * 6 + 8 * 5 + 4 * 8 + 2 * 4 + 4 * 1
    assert state_nbytes_by_kind(optimizer) == {"factors": 24 + 40 + 32, "nested": 8 + 4}


class _Projector:
    """Like GaLore's projector: a helper object in the state that holds a tensor."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.ortho_matrix = matrix
        self.rank = matrix.shape[1]
        self.owner = self  # a cycle must not loop forever


def test_tensors_held_by_objects_in_the_state_count():
    shared = torch.zeros(6, 2)
    optimizer = _optimizer({"projector": _Projector(shared), "exp_avg": torch.zeros(2, 3)}, {"again": shared[:1]})
    assert optimizer_state_nbytes(optimizer) == 4 * 12 + 4 * 6
    assert state_nbytes_by_kind(optimizer) == {"projector": 48, "exp_avg": 24, "again": 0}
    # Functions and classes are not walked.
    assert optimizer_state_nbytes(_optimizer({"fn": torch.zeros, "cls": _Projector})) == 0


def test_step_excluded_by_default_and_included_on_request():
    optimizer = _optimizer(
        {"step": torch.tensor(3.0), "exp_avg": torch.zeros(10)},
        {"step": torch.tensor(3, dtype=torch.int64), "exp_avg": torch.zeros(2, 2)},
    )
    assert optimizer_state_nbytes(optimizer) == 4 * 10 + 4 * 4
    assert optimizer_state_nbytes(optimizer, include_step=True) == 4 * 10 + 4 * 4 + 4 + 8
    assert "step" not in state_nbytes_by_kind(optimizer)


def test_step_sharing_a_storage_counts_once():
    buffer = torch.zeros(5)
    optimizer = _optimizer({"step": buffer[0], "exp_avg": buffer[1:]})
    assert optimizer_state_nbytes(optimizer) == 20
    assert optimizer_state_nbytes(optimizer, include_step=True) == 20


def test_meta_tensors_are_sized_per_storage():
    base = torch.empty(10, 10, device="meta")
    optimizer = _optimizer({"a": base, "b": base[3:]}, {"c": torch.empty(5, device="meta")})
    assert optimizer_state_nbytes(optimizer) == 4 * 100 + 4 * 5


def test_sums_match():
    big = torch.zeros(64)
    optimizer = _optimizer(
        {"a": big[:4], "b": [big, torch.zeros(3)]}, {"c": torch.zeros(2, 2), "step": torch.tensor(1.0)}
    )
    assert sum(state_nbytes_by_kind(optimizer).values()) == optimizer_state_nbytes(optimizer)


@pytest.mark.parametrize("foreach", [False, True])
def test_torch_adamw_after_one_step(foreach):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=foreach)
    model(torch.randn(16, 12)).square().mean().backward()
    optimizer.step()
    numel = sum(p.numel() for p in model.parameters())
    assert numel == 12 * 20 + 20 + 20 * 3 + 3
    assert optimizer_state_nbytes(optimizer) == 8 * numel
    assert state_nbytes_by_kind(optimizer) == {"exp_avg": 4 * numel, "exp_avg_sq": 4 * numel}
    steps = sum(state["step"].untyped_storage().nbytes() for state in optimizer.state.values())
    assert optimizer_state_nbytes(optimizer, include_step=True) == 8 * numel + steps


def test_coap_adamw_low_rank_state():
    weight = torch.nn.Parameter(torch.randn(64, 48, generator=torch.Generator().manual_seed(0)))
    optimizer = CoapAdamW([weight], lr=1e-3, rank=8)
    weight.grad = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    optimizer.step()
    # P (48, 8) on the smaller side, moments (64, 8) each, float32.
    assert optimizer_state_nbytes(optimizer) == 4 * (2 * 64 * 8 + 48 * 8)
    assert state_nbytes_by_kind(optimizer) == {"proj": 4 * 48 * 8, "exp_avg": 4 * 64 * 8, "exp_avg_sq": 4 * 64 * 8}


def test_dtensor_state_counts_the_local_shard():
    """FSDP2 keeps DTensor moments: each rank counts the bytes of the shard it holds."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        moment = distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)])
        optimizer = _optimizer({"exp_avg": moment, "exp_avg_sq": torch.zeros(3)})
        assert optimizer_state_nbytes(optimizer) == 4 * 24 + 4 * 3
    finally:
        dist.destroy_process_group()
