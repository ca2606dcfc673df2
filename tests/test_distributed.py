"""Data-parallel training of an optimized residual MLP: DDP and FSDP2, two CPU processes (gloo).

Each rank trains ``optimize(model)`` on its half of every global batch; a single process trains
the unoptimized model eagerly on the whole batch. Both average the loss over the global batch,
so after the same steps the parameters must agree up to summation order (float64).
"""

import datetime
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from tritskip.graph_pass import optimize
from tritskip.ops import force_backend

WORLD = 2
STEPS = 4
ROWS = 8  # global batch, split evenly over the ranks
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed/gloo"
)


class Block(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class MLP(nn.Module):
    def __init__(self, d=16, hidden=32, depth=3):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(d, hidden) for _ in range(depth)])
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        return self.head(self.blocks(x))


def _model():
    torch.manual_seed(0)
    return MLP().double()


def _batches():
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(STEPS, ROWS, 16, generator=g, dtype=torch.float64)
    ys = torch.randn(STEPS, ROWS, 1, generator=g, dtype=torch.float64)
    return xs, ys


def _train(model, params, xs, ys):
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    for x, y in zip(xs, ys, strict=True):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _fsdp(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    # Optimized blocks still run their own forward, so each is one FSDP unit.
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT_S)
    )
    try:
        xs, ys = _batches()
        shard = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
        with force_backend("torch"):
            for kind in ("ddp", "fsdp"):
                model = _model()
                # Optimize per block so every block keeps its own forward (an FSDP unit).
                for i, block in enumerate(model.blocks):
                    model.blocks[i] = optimize(block)
                    assert "fused_linear" in model.blocks[i].code, "the block was not fused"
                if kind == "ddp":
                    wrapped = nn.parallel.DistributedDataParallel(model)
                    _train(wrapped, wrapped.parameters(), xs[:, shard], ys[:, shard])
                    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    wrapped = _fsdp(model)
                    _train(wrapped, wrapped.parameters(), xs[:, shard], ys[:, shard])
                    state = {k: v.full_tensor() for k, v in wrapped.state_dict().items()}
                if rank == 0:
                    torch.save(state, os.path.join(out_dir, f"{kind}.pt"))
                dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained():
    """Final parameters of each data-parallel run, keyed by 'ddp' and 'fsdp'."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + TIMEOUT_S
        try:
            # join() returns False while some worker is still running; it raises if one failed.
            while not context.join(timeout=max(deadline - time.monotonic(), 0)):
                assert time.monotonic() < deadline, f"workers still running after {TIMEOUT_S} s"
        finally:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
        yield {k: torch.load(os.path.join(out_dir, f"{k}.pt")) for k in ("ddp", "fsdp")}


@pytest.fixture(scope="module")
def reference():
    model = _model()
    xs, ys = _batches()
    _train(model, model.parameters(), xs, ys)
    return model.state_dict()


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_data_parallel_matches_single_process_eager(trained, reference, kind):
    state = trained[kind]
    assert state.keys() == reference.keys()
    initial = _model().state_dict()
    for name, expected in reference.items():
        assert not torch.equal(expected, initial[name]), f"{name} did not train"
        torch.testing.assert_close(state[name], expected, msg=lambda m, n=name: f"{kind} {n}: {m}")
