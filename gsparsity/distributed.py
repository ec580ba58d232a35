"""Processes and devices: one CPU, one GPU, several GPUs, several nodes.

- Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) every
  process joins the group given by ``--dist-url`` (``env://`` by default).
- A plain ``python main_*.py`` on a node with several GPUs spawns one process per
  GPU (``--world-size``/``--rank`` name the nodes, as in pytorch/examples).
- Otherwise one process runs on one GPU or on the CPU, with no process group.
NCCL is used on CUDA and gloo on CPU; no cluster-specific variable is needed.

If a process dies, the others fail in their next collective: with gloo at once (the
dead peer's connections close, measured at about 2 s on CPU), with NCCL when
``--dist-timeout`` runs out (NCCL's watchdog then aborts the process). Under
``torchrun`` the launcher also stops the remaining processes as soon as one exits.
:class:`ProcessGroupFailure` turns gloo's and NCCL's errors into one clear line.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .cpu_memory import keep_freed_memory
from .errors import UserError


class ProcessGroupFailure(Exception):
    """A collective failed because another process is gone or unreachable."""


# Words in the RuntimeError that gloo or NCCL raise when a peer's connection breaks.
TRANSPORT_FAILURE_WORDS = ("gloo", "nccl", "connection reset", "connection closed", "broken pipe")


def is_transport_failure(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(word in text for word in TRANSPORT_FAILURE_WORDS)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchSettings:
    """Where the processes of a run go and how they meet (``--device``, ``--gpu``,
    ``--world-size``, ``--rank``, ``--dist-url``, ``--dist-backend``, ``--dist-timeout``)."""

    device: str = "auto"
    gpu: int | None = None
    world_size: int = -1  # nodes (pytorch/examples' spelling); -1: not given
    rank: int = -1  # this node's
    dist_url: str = "env://"
    dist_backend: str = "auto"  # auto: NCCL on CUDA, gloo on CPU
    dist_timeout: float = 30.0  # minutes a collective waits for a peer
    batch_size: int = 1  # the global batch, split over the processes
    seed: int | None = None  # seeded runs ask cuDNN for deterministic kernels

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LaunchSettings":
        return cls(device=args.device, gpu=args.gpu, world_size=args.world_size, rank=args.rank,
                   dist_url=args.dist_url, dist_backend=args.dist_backend, dist_timeout=args.dist_timeout,
                   batch_size=args.batch_size, seed=args.seed)


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def resolve_device_type(requested: str) -> str:
    """'cuda' or 'cpu' from --device; a clear error if CUDA is asked for but absent."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch (use --device cpu)")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def processes_to_spawn(launch: LaunchSettings) -> int:
    """How many processes this node spawns itself, one per GPU (0: run in this process).
    A node of a multi-node run (``--world-size`` > 1) spawns even for one GPU, so that it
    joins the others rather than training alone."""
    if launch.gpu is not None and launch.world_size > 1 and not launched_by_torchrun():
        raise UserError(f"--gpu {launch.gpu} runs one process alone; with --world-size {launch.world_size} "
                        f"leave it out (each node spawns one process per GPU) or use torchrun")
    if launched_by_torchrun() or launch.gpu is not None:
        return 0
    if resolve_device_type(launch.device) != "cuda":
        if launch.world_size > 1:
            raise UserError(f"--world-size {launch.world_size}: spawning one process per node needs GPUs; "
                            f"on CPUs start every node with torchrun instead")
        return 0
    if launch.world_size > 1:
        check_node_can_meet_the_others(launch)
    gpus = torch.cuda.device_count()
    return gpus if gpus > 1 or launch.world_size > 1 else 0


def check_node_can_meet_the_others(launch: LaunchSettings) -> None:
    """Refuse, before any process waits, a multi-node launch whose nodes would never meet:
    each node needs its own --rank, and all of them the address of node 0."""
    if not 0 <= launch.rank < launch.world_size:
        raise UserError(f"--world-size {launch.world_size}: give each node its --rank, 0 to "
                        f"{launch.world_size - 1} (got {launch.rank})")
    if launch.dist_url == "env://" and not all(name in os.environ for name in ("MASTER_ADDR", "MASTER_PORT")):
        raise UserError(f"--world-size {launch.world_size} with --dist-url env://: set MASTER_ADDR and "
                        f"MASTER_PORT to node 0's address on every node, or give --dist-url tcp://HOST:PORT")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class SpawnPlan:
    """Where the processes this node spawns sit in the run (one per GPU)."""

    node_rank: int
    world_size: int  # processes of the whole run: nodes x GPUs per node


def prepare_spawn(launch: LaunchSettings, gpus_per_node: int) -> SpawnPlan:
    """What spawned processes need to find each other: the rendezvous on this node, and their
    places in the run. The flags are left as parsed: run_info.json keeps them as typed, and a
    resumed run would otherwise multiply a stored total again."""
    if launch.dist_url == "env://":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    return SpawnPlan(node_rank=max(launch.rank, 0), world_size=max(launch.world_size, 1) * gpus_per_node)


def setup(launch: LaunchSettings, local_index: int | None = None, plan: SpawnPlan | None = None) -> DistContext:
    """Join the process group (if any) and pick this process's device (``local_index`` and
    ``plan``: a process this node spawned)."""
    device_type = resolve_device_type(launch.device)
    rank, world_size, local_rank = process_place(launch, local_index, plan)
    if launch.batch_size < world_size:  # refused by every process alike, before any of them waits
        raise UserError(f"--batch-size {launch.batch_size} is smaller than the number of processes "
                        f"({world_size}); it is the global batch, split across them")
    device = claim_device(launch, device_type, local_rank)
    if world_size > 1:
        join_process_group(launch, device, rank, world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def process_place(launch: LaunchSettings, local_index: int | None,
                  plan: SpawnPlan | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process: from torchrun's environment, from
    this node's spawning, or a lone process."""
    if launched_by_torchrun():
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if launch.gpu is not None and world_size > 1:  # every process would take the same GPU
            raise UserError(f"--gpu {launch.gpu} under torchrun: each process uses the GPU of its "
                            f"LOCAL_RANK; leave --gpu out")
        return rank, world_size, int(os.environ["LOCAL_RANK"])
    if local_index is not None:  # spawned by this node, one process per GPU, with the node's plan
        return plan.node_rank * torch.cuda.device_count() + local_index, plan.world_size, local_index
    return 0, 1, 0


def claim_device(launch: LaunchSettings, device_type: str, local_rank: int) -> torch.device:
    """The CPU (its malloc keeping freed memory, see cpu_memory.py), or the GPU of ``--gpu`` /
    the local rank, made current and set up for cuDNN."""
    if device_type != "cuda":
        keep_freed_memory()  # large activations stop faulting in anew at every step
        return torch.device("cpu")
    index = launch.gpu if launch.gpu is not None else local_rank
    if index >= torch.cuda.device_count():
        raise UserError(f"GPU {index} asked for, but only {torch.cuda.device_count()} visible")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    configure_cudnn(seeded=launch.seed is not None)
    return device


def join_process_group(launch: LaunchSettings, device: torch.device, rank: int, world_size: int) -> None:
    backend = launch.dist_backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend, init_method=launch.dist_url, rank=rank, world_size=world_size,
        timeout=datetime.timedelta(minutes=launch.dist_timeout),
        **({"device_id": device} if device.type == "cuda" else {}),
    )


def configure_cudnn(seeded: bool) -> None:
    """Let cuDNN time its convolution algorithms on the first batches and keep the fastest
    (a run meets few batch shapes); with ``--seed``, deterministic algorithms instead, as
    in pytorch/examples, at some cost in speed."""
    torch.backends.cudnn.benchmark = not seeded
    torch.backends.cudnn.deterministic = seeded


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes in place (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over processes in place (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_module_states(module: torch.nn.Module) -> None:
    """Give every process rank 0's parameters and buffers, in place. DDP does the same when
    it wraps the model; the search needs it earlier, for its budget probes and start norms."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for tensor in module.state_dict().values():  # detached, sharing the parameters' storage
        dist.broadcast(tensor, src=0)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the experiment folder name)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
