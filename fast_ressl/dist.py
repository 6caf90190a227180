"""Distributed set-up (torchrun env vars; one process needs none), gathers without grad, shuffle-BN,
and a small gloo control group for host-side agreement (preemption) that never touches the GPU."""
from __future__ import annotations

import datetime
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

# torch 2.14 renamed all_gather_into_tensor to all_gather_single and made the old name warn (a
# FutureWarning on every rank of every multi-rank run); the GPU image's torch 2.11 has only the old name
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# "1": a single rank still makes the process group (NCCL on a GPU) and runs the multi-rank code
# path: DDP, shuffle-BN through all_gather, the collectives of the NaN guard, checkpoints and kNN
# monitor. It is how a one-GPU machine tests what a multi-GPU run does (NCCL refuses two ranks on one
# GPU); for training it only costs DDP's bucket copies. Needs torchrun's env:// variables.
ONE_RANK_GROUP_ENV = "FAST_RESSL_DDP_ONE_RANK"


@dataclass
class Env:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    ctrl_group: Any = None  # gloo group for host flags and per-rank checkpoint state

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one rank, or one rank in a process group (ONE_RANK_GROUP_ENV)."""
        return self.world_size > 1 or self.ctrl_group is not None


# The signals that stop a run at the next step boundary with a checkpoint (train._SignalFlag) and
# that the torch loader's workers leave to the trainer: SIGTERM (docker stop, torchrun on
# preemption, schedulers), SIGINT (Ctrl-C), SIGHUP (a closed terminal; torchrun forwards it) and
# SIGUSR1 (Slurm's usual requeue warning, --signal=USR1@T; torchrun forwards it when named in
# --signals-to-handle). SIGHUP and SIGUSR1 used to end a run with no checkpoint (found in review).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device_pref: str, timeout_s: float = 600.0) -> Env:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPU, gloo on CPU.

    A collective that waits longer than timeout_s (e.g. a peer rank died) raises instead of hanging.
    """
    world = world_size_from_env()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        from .config import ConfigError  # one line naming the key, not a traceback

        raise ConfigError("run.device=cuda but no CUDA device is visible (run.device=auto uses one when "
                          "there is one)")
    device = torch.device("cuda", local_rank) if device_pref == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1 and os.environ.get(ONE_RANK_GROUP_ENV) != "1":
        return Env(device=device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=_attempt_store(timeout),
                                rank=rank, world_size=world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    ctrl = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return Env(device=device, rank=dist.get_rank(), world_size=dist.get_world_size(),
               local_rank=local_rank, ctrl_group=ctrl)


def wait_for_all(env: Env, timeout_s: float) -> None:
    """Every rank reaches this point before any goes on, waiting up to `timeout_s` (not the
    collectives' train.dist_timeout_s). After the data set-up: each node's first rank scans its own
    denylist (or writes webdataset index files) where the node lacks them, an hour for ImageNet, while
    a node that has them is ready at once; the first collective after it would time out."""
    if env.ctrl_group is not None:
        dist.monitored_barrier(group=env.ctrl_group, timeout=datetime.timedelta(seconds=timeout_s),
                               wait_all_ranks=True)


def _attempt_store(timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store (env://, as torchrun sets it up), with every key under this restart
    attempt's prefix.

    torchrun's static rendezvous keeps one store for all restart attempts, and torch assumes "a new
    TCPStore for every retry": after `--max-restarts` restarted the workers, the ranks read their
    peers' gloo addresses from the previous attempt's keys and failed with "Gloo connectFullMesh
    failed ... Connection refused" at once, or waited in init_process_group (reproduced on CPU with
    gloo, kill -9 of one of 2 workers). With TORCHELASTIC_RESTART_COUNT in the prefix each attempt
    meets only its own keys; every group made later (the gloo control group) inherits the prefix.

    That count is each launcher's own, though: on several nodes a launcher whose worker did not fail
    restarts without counting (torch's elastic agent: "membership changes do not count as
    retries"), so the nodes' prefixes differ and the restart fails the same way (found in review,
    reproduced with two launchers on one host). With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every
    launcher (c10d rendezvous) each round gets a store of its own (TORCHELASTIC_USE_AGENT_STORE is
    then False): nothing stale to step around, so no prefix; that is what the README's multi-node
    command and the Docker image set."""
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://", timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # a store of this round's own, or no torchrun
        return store
    nodes_launch = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) < \
        int(os.environ.get("WORLD_SIZE", "1"))
    if nodes_launch and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and \
            os.environ.get("RANK") == "0":
        print("fast-ressl: warning: torchrun on several nodes with --max-restarts and one rendezvous store "
              "for every round: a restart can fail to connect (each node counts its restarts itself); set "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for every node's torchrun", file=sys.stderr)
    return dist.PrefixStore(f"fast_ressl/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def all_gather_cat(x: torch.Tensor, env: Env) -> torch.Tensor:
    """(N, ...) per rank -> (world*N, ...) in rank order, identical on every rank. No gradient.

    A channels_last (N, C, H, W) input is gathered as its NHWC storage and returned channels_last,
    so the teacher forwards the gathered batch without a layout copy (`.contiguous()` would have
    converted it to NCHW: a copy, then NCHW kernels)."""
    if not env.distributed:
        return x
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return all_gather_cat(x.permute(0, 2, 3, 1), env).permute(0, 3, 1, 2)  # NHWC view, no copy
    out = torch.empty((env.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x.contiguous())
    return out


def any_flag(flag: bool, env: Env) -> bool:
    """True on every rank if any rank's host flag is set (gloo, CPU only: no GPU sync)."""
    if not env.distributed:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.ctrl_group)
    return bool(t.item())


def gather_objects(obj: Any, env: Env) -> List[Any]:
    """Every rank's picklable object, in rank order, on every rank (over the gloo control group:
    host-side, never inside a timed or hot step)."""
    if not env.distributed:
        return [obj]
    out: List[Optional[Any]] = [None] * env.world_size
    dist.all_gather_object(out, obj, group=env.ctrl_group)
    return out


def all_reduce_(t: torch.Tensor, env: Env, op: str = "max") -> torch.Tensor:
    """In-place all-reduce of a device tensor (async on the GPU: no host sync)."""
    if env.distributed:
        dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op])
    return t


# A 32-bit integer mixer (the "lowbias32" construction; constants below 2**31 so that every product
# of a 32-bit value fits in int64 on every device: no overflow, identical results on CPU and CUDA).
_MIX = (0x7FEB352D, 0x2C1B3C6D)
_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    for c in _MIX:
        x = torch.bitwise_xor(x, x >> 16)
        x = (x * c) & _M32
    return torch.bitwise_xor(x, x >> 15)


def shuffle_permutation(seed: int, step: int, n: int, device: torch.device | str) -> torch.Tensor:
    """(n,) int64 permutation of range(n), made on `device` from (seed, step) alone.

    Every rank computes the same permutation without a broadcast, and without a host-to-device copy:
    a permutation drawn on the CPU and moved with a blocking `.to(device)` stalled the host once per
    step. Keys are a hash of (seed, step, index), sorted stably (ties, if any, keep index order)."""
    salt = ((seed * 1_000_003 + step) * 0x9E3779B1) & _M32
    keys = _mix32(torch.arange(n, dtype=torch.int64, device=device) + salt)
    keys = _mix32(keys ^ ((seed & _M32) + 0x632BE5AB))
    return torch.argsort(keys, stable=True)


@torch.no_grad()
def teacher_keys(teacher: torch.nn.Module, x_weak: torch.Tensor, env: Env, policy: str,
                 step: int, seed: int) -> torch.Tensor:
    """Teacher embeddings (not normalised) of the GLOBAL weak batch: (world*N, D), rank order.

    policy 'shuffle' (MoCo's shuffle-BN): the images of all ranks are gathered (channels_last kept),
    permuted with a permutation every rank derives on the device from (seed, step) (no broadcast, no
    host sync), each rank forwards its slice, and the keys are gathered and unshuffled, so a rank's
    BN batch mixes samples of all ranks and BN statistics cannot leak which samples belong together.
    On one rank 'shuffle' permutes the batch itself: with BN groups (model.bn_group_size) the
    teacher's groups then differ from the student's, as on 8 GPUs with shuffle-BN.
    'local' and 'sync' forward the local batch (with SyncBatchNorm converted in for 'sync') and
    gather the keys.
    """
    n = x_weak.shape[0]
    if policy != "shuffle":
        return all_gather_cat(teacher(x_weak), env)
    x_all = all_gather_cat(x_weak, env)
    perm = shuffle_permutation(seed, step, env.world_size * n, x_weak.device)
    mine = perm[env.rank * n:(env.rank + 1) * n]
    if x_all.dim() == 4 and x_all.is_contiguous(memory_format=torch.channels_last):
        # a row gather on the NHWC view keeps the slice channels_last (indexing NCHW would not)
        x_mine = x_all.permute(0, 2, 3, 1).index_select(0, mine).permute(0, 3, 1, 2)
    else:
        x_mine = x_all.index_select(0, mine)
    k_shuffled = all_gather_cat(teacher(x_mine), env)  # row j holds sample perm[j]
    return torch.empty_like(k_shuffled).index_copy_(0, perm, k_shuffled)  # row perm[j] <- row j
