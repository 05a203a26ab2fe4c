"""torch.distributed set-up shared by the train and sample entry points.

One code path for every launch: under torchrun the process group comes from the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); run directly, the
process makes a one-member group on a free local port. NCCL on a GPU, gloo on a CPU.
"""

import dataclasses
import os
import socket
import sys
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank, the world size, its local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: Optional[str] = None) -> DistContext:
    """Join (or make) the default process group and pick this process's device.

    device: "cpu", "cuda" or None (CUDA when available). On CUDA each process takes
    cuda:LOCAL_RANK and NCCL; on the CPU gloo.
    """
    if "RANK" in os.environ:
        rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        local_rank = _env_int("LOCAL_RANK", rank)
    else:
        rank, world_size, local_rank = 0, 1, 0
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"init_distributed: device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("init_distributed: device='cuda' but no CUDA device is visible")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                **({"device_id": dev} if backend == "nccl" else {}))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed(synchronize: bool = True) -> None:
    """Tears the process group down; with synchronize, after every rank has got here, so
    that none closes its connections while a peer still uses them (gloo then aborts the
    peer at exit, "terminate called without an active exception", seen with torch 2.11)."""
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def run_in_process_group(fn: Callable[[Any, DistContext], None], args: Any,
                         device: Optional[str] = None) -> None:
    """fn(args, ctx) inside the process group, which is torn down however fn ends (after
    a barrier where fn returned: a rank that raised does not wait for the others)."""
    ctx = init_distributed(device)
    finished = False
    try:
        fn(args, ctx)
        finished = True
    finally:
        cleanup_distributed(synchronize=finished)


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (picklable objects; small ones)."""
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The average of a per-rank scalar over all ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def exit_process(code: int = 0) -> None:
    """Ends a finished command-line run (its process group already torn down) without
    the interpreter's teardown: under torchrun with gloo, torch 2.11's teardown at times
    aborts a rank after all its work is done and written ("terminate called without an
    active exception"), which would fail a run that succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

