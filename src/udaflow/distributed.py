"""Data-parallel training over processes started by torchrun (gloo on CPU, nccl on GPU).

The global batch stays `train.batch_size` per domain: every rank draws the same global batch from
the same seeded generator, augments it the same way, and trains on its own contiguous share of the
rows (`shard`). After backward the gradients are averaged over ranks in one all-reduce of a flat
buffer (what DistributedDataParallel does, without overlapping it with backward: the methods call
the classifier's parts directly, so DDP's forward hooks would not see them). BatchNorm statistics
are reduced over all ranks (`SyncedBatchNorm1d/2d`; torch's SyncBatchNorm refuses CPU tensors). Whatever
is computed over a whole domain (features for pseudo-labels, centroids, pairs, validator scores) is
computed on each rank's share of the images and all-gathered, so every rank holds the same values.
With equal shares, the mean loss of the global batch is the average of the ranks' mean losses, so
one step equals the single-process step on the same global batch up to float rounding.

Rank 0 alone writes checkpoints and stage files and prints progress; the parent process (the
Prefect flow) logs, registers and versions, as without DDP.

Example (two processes on one machine):
    torchrun --standalone --nproc_per_node 2 -m udaflow.distributed adapt --params resolved.json --out outcome.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "cpu") -> None:
    """Join the process group torchrun describes in the environment (no-op without torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def share(n: int) -> slice:
    """This rank's contiguous rows of a global batch of n (n must divide evenly: equal shares keep the mean loss exact)."""
    w = world_size()
    if n % w:
        raise ValueError(f"a global batch of {n} cannot be split evenly over {w} processes: make train.batch_size a multiple of {w}")
    k = n // w
    return slice(rank() * k, (rank() + 1) * k)


def shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a tensor whose first dimension is the global batch (identity in one process)."""
    return x[share(len(x))] if active() else x


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (ranks may hold different row counts); identity in one process."""
    if not active():
        return x
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)]))
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def gather_rows(n: int, compute: Callable[[slice], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Run `compute` on this rank's share of rows 0..n-1 (contiguous, nearly equal) and all-gather each output."""
    if not active():
        return compute(slice(0, n))
    w, r = world_size(), rank()
    bounds = [n * i // w for i in range(w + 1)]
    return tuple(gather(t) for t in compute(slice(bounds[r], bounds[r + 1])))


def average_gradients(parameters: list[torch.Tensor]) -> None:
    """Average .grad over ranks in one all-reduce (a missing grad counts as zero, as in DDP)."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p, g in zip(parameters, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean of each scalar over ranks (for the loss record only; no gradient flows)."""
    if not active() or not values:
        return values
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    dist.all_reduce(stacked)
    stacked /= world_size()
    return dict(zip(values.keys(), stacked))


class _SumOverRanks(torch.autograd.Function):
    """all-reduce (sum) whose backward all-reduces the gradient: d(sum over ranks of losses)/dx."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _SyncedStatistics:
    """Batch normalisation whose training statistics are the mean and variance over every rank's rows.

    Forward all-reduces (sum x, sum x^2, count) per channel through a differentiable all-reduce, so
    backward sums each statistic's gradient over ranks too; with the gradients then averaged this
    equals BatchNorm over the global batch. Outside training or without torchrun it is plain BatchNorm.
    """

    act_after = False  # True for a twin of timm's BatchNormAct2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]  # every axis but the channel one
        xf = x.float()
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float32, device=x.device)
        stats = _SumOverRanks.apply(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        c, n = self.num_features, stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean**2).clamp_min(0)  # biased, as BatchNorm normalises with
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        y = y.to(x.dtype)
        if self.act_after:  # timm's BatchNormAct2d: its dropout and activation after the normalisation
            y = self.act(self.drop(y))
        return y


class SyncedBatchNorm1d(_SyncedStatistics, nn.BatchNorm1d):
    pass


class SyncedBatchNorm2d(_SyncedStatistics, nn.BatchNorm2d):
    pass


_SYNCED = {nn.BatchNorm1d: SyncedBatchNorm1d, nn.BatchNorm2d: SyncedBatchNorm2d}


def sync_batchnorm_(module: nn.Module) -> nn.Module:
    """Turn every BatchNorm1d/2d of `module`, subclasses included (timm's BatchNormAct2d: BatchNorm, then
    dropout and activation), into its synced twin in place (same parameters, buffers, state_dict keys).
    Until 2026-12-06 only the two exact types were: mobilenetv3, efficientnet and regnet normalised each
    rank's rows alone. A subclass with a forward of its own is refused, not left unsynced."""
    for m in module.modules():
        twin = _synced_twin(type(m))
        if twin is not None:
            m.__class__ = twin
    return module


def check_syncable(module: nn.Module) -> None:
    """ConfigError when a BatchNorm layer of `module` cannot be synced over processes (before `--nproc` trains)."""
    for m in module.modules():
        _synced_twin(type(m))


def _synced_twin(cls: type) -> type | None:
    """The synced class of a BatchNorm1d/2d class (made once per subclass); None for any other module."""
    if cls in _SYNCED:
        return _SYNCED[cls]
    base = next((b for b in (nn.BatchNorm1d, nn.BatchNorm2d) if issubclass(cls, b)), None)
    if base is None or issubclass(cls, _SyncedStatistics):
        return None
    if cls.forward is not base.forward and not _normalise_then_act(cls):
        from udaflow.config import ConfigError

        raise ConfigError(f"train.nproc: {cls.__module__}.{cls.__name__}, a BatchNorm layer of the backbone with a forward of its "
                          "own, cannot be synchronised over processes: its statistics would be each process's rows alone",
                          hint="train with one process (--nproc 1), or pick a backbone with plain BatchNorm layers")
    act_after = cls.forward is not base.forward  # BatchNormAct2d's: normalise, then its dropout and activation
    _SYNCED[cls] = type(f"Synced{cls.__name__}", (_SyncedStatistics, cls), {"__module__": __name__, "act_after": act_after})
    return _SYNCED[cls]


def _normalise_then_act(cls: type) -> bool:
    """timm's BatchNormAct2d (its forward: BatchNorm2d's, then `self.drop`, then `self.act`)."""
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return issubclass(cls, BatchNormAct2d) and cls.forward is BatchNormAct2d.forward


def unsync_batchnorm_(module: nn.Module) -> nn.Module:
    plain = {v: k for k, v in _SYNCED.items()}
    for m in module.modules():
        if type(m) in plain:
            m.__class__ = plain[type(m)]
    return module


# --- launching: `udaflow run --nproc N` runs the training stages through torchrun ---------------


def die_with_parent(parent: int | None = None) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies.

    torchrun starts each rank in a session of its own, so a `kill -9` of `udaflow run` (or of its
    process group) would otherwise leave the ranks training on, writing stage files after the run
    is gone. A rank dies with the torchrun agent, the agent with `udaflow run`; the re-run then
    resumes from rank 0's last checkpoint. `udaflow bench --jobs N`'s workers die with the bench the
    same way. `parent`: the pid this process was started by, when it may have died before this call
    (a spawned worker imports torch first); by default the current parent.
    """
    if _LIBC is None:
        return
    parent = os.getppid() if parent is None else parent
    _LIBC.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


# loaded once here, not between fork and exec (preexec_fn), where dlopen could deadlock on a lock another thread held
_LIBC = __import__("ctypes").CDLL(None) if sys.platform.startswith("linux") else None


def launch(stage: str, cfg, out: Path, **paths: Path | None) -> dict:
    """Run `stage` (pretrain | adapt) under `torchrun --nproc_per_node cfg.train.nproc` and return
    rank 0's outcome (what steps.pretrain / steps.adapt return, as a dict)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = out.with_suffix(".params.json")
    spec.write_text(json.dumps(cfg.model_dump(mode="json")))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.train.nproc}",
        "-m", "udaflow.distributed", stage, "--params", str(spec), "--out", str(out),
    ]
    for key, value in paths.items():
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    n, batch = cfg.train.nproc, cfg.train.batch_size
    sys.stderr.write(f"{stage}: {n} processes under torchrun (global batch {batch} per domain, {batch // n} per process)\n")
    sys.stderr.flush()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, preexec_fn=die_with_parent)
    if done.returncode != 0:
        raise RuntimeError(f"{stage} under torchrun ({cfg.train.nproc} processes) failed with exit code {done.returncode}; its ranks' output is above")
    outcome = json.loads(out.read_text())
    out.unlink()
    spec.unlink(missing_ok=True)
    return outcome


def main(argv: list[str] | None = None) -> int:
    """One rank of a stage started by `launch`."""
    from udaflow import steps
    from udaflow.config import Config

    parser = argparse.ArgumentParser(prog="python -m udaflow.distributed")
    parser.add_argument("stage", choices=["pretrain", "adapt"])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--source-model", type=Path)
    args = parser.parse_args(argv)
    die_with_parent()
    cfg = Config.model_validate(json.loads(args.params.read_text()))
    init_from_env(cfg.train.device)
    # no barrier when this rank fails: the others wait in a collective it will never join (a gradient
    # all-reduce), and a barrier here held both until gloo's 30-minute timeout, the error unprinted. Raising
    # ends this process; torchrun then stops the other ranks and `launch` fails with its exit code.
    if args.stage == "pretrain":
        outcome = steps.pretrain(cfg, cache_dir=args.cache_dir)
    else:
        outcome = steps.adapt(cfg, source_model=args.source_model)
    if is_main():
        args.out.write_text(json.dumps(asdict(outcome)))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: `udaflow run` says it once, without each rank's traceback
        sys.exit(130)
