"""The training loop under torch DDP (2 CPU processes, gloo): gradient accumulation with no_sync
keeps replicas identical, and a NaN on one rank stops every rank at the same step."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fldd.train import NonFiniteLossError, TrainSchedule, build_optimizer, train_loop
from tests.conftest import tiny_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        model = tiny_model({"train.grad_accum_steps": 2}, T=2, double=False)
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        optimizer = build_optimizer(model, model.config.train)
        torch.manual_seed(100 + rank)  # different data and z_t per rank
        batches = iter(lambda: torch.randint(0, 3, (2, 2)), None)
        schedule = TrainSchedule(model.config.train, True)
        train_loop(ddp, batches, optimizer, num_steps=3, schedule=schedule, accumulation_steps=2)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(2)]
        dist.all_gather(gathered, flat)
        results.put(("identical", rank, bool(torch.equal(gathered[0], gathered[1]))))
        if rank == 1:  # a NaN on rank 1 only
            with torch.no_grad():
                model.reverse.output_layer.bias.fill_(float("nan"))
        try:
            train_loop(ddp, batches, optimizer, num_steps=6, start_step=3, schedule=schedule, accumulation_steps=2)
            results.put(("nan", rank, "no error"))
        except NonFiniteLossError as error:
            results.put(("nan", rank, str(error)))
    finally:
        dist.destroy_process_group()


def test_ddp_accumulation_and_collective_nan_check():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(worker, args=(free_port(), results), nprocs=2, start_method="spawn", join=True)
    got = {}
    while not results.empty():
        kind, rank, value = results.get()
        got[(kind, rank)] = value
    assert got[("identical", 0)] and got[("identical", 1)]
    assert "step 3" in got[("nan", 1)] and "kl" in got[("nan", 1)]
    assert got[("nan", 0)] == "non-finite loss on another worker at step 3"
