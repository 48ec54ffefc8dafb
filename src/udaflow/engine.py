"""The one training / evaluation loop, for every method.

The engine owns the optimiser (AdamW, no decay on norms and biases), the schedule (linear warm-up
then cosine), AMP (bf16 autocast on CUDA), checkpoints (atomic, every N steps, resumable to the
same bits on CPU), the label-free checkpoint selection and the progress report. Methods only turn a
batch into named losses.
"""

from __future__ import annotations

import copy
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from udaflow.auxiliary import RotationHead, rotation_loss
from udaflow.config import TrainConfig
from udaflow.data.datasets import LabelledImages, UnlabelledImages
from udaflow.data.transforms import augment_view, to_input
from udaflow.methods.base import Batch, Method, StepContext
from udaflow.models.heads import Classifier
from udaflow.validators import SOURCE_AWARE, dev_score, get_validator, score_all


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but no CUDA GPU is visible; use --device cpu")
    return device


def seed_everything(seed: int, deterministic: bool = True, num_threads: int | None = None) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _autocast(device: torch.device, amp: bool):
    enabled = amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def predict(
    classifier: Classifier, images: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 512, amp: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) and logits (N, K) on CPU, float32, in eval mode; restores the train/eval mode."""
    device = torch.device(device)
    was_training = classifier.training
    classifier.eval()
    feats, logits = [], []
    try:
        for i in range(0, len(images), batch_size):
            x = to_input(images[i : i + batch_size], device)
            with _autocast(device, amp):
                f = classifier.features(x)
                g = classifier.head(f)
            feats.append(f.float().cpu())
            logits.append(g.float().cpu())
    finally:
        classifier.train(was_training)
    return torch.cat(feats), torch.cat(logits)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(1) == labels).float().mean() * 100.0)


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    pred = logits.argmax(1)
    out: list[float | None] = []
    for k in range(num_classes):
        mask = labels == k
        out.append(float((pred[mask] == k).float().mean() * 100.0) if mask.any() else None)
    return out


def evaluate(classifier: Classifier, data: LabelledImages, device: torch.device | str = "cpu") -> dict[str, Any]:
    _, logits = predict(classifier, data.images, device)
    return {
        "acc": accuracy(logits, data.labels),
        "per_class": per_class_accuracy(logits, data.labels, len(data.classes)),
        "logits": logits,
    }


@dataclass
class TrainResult:
    last_state: dict[str, torch.Tensor]  # classifier weights after the last step
    selected_state: dict[str, torch.Tensor]  # classifier weights the label-free validator preferred
    selected_step: int
    selected_by: str
    validator_history: list[dict[str, float]]  # one row per evaluation: step + every validator score
    loss_history: list[dict[str, float]]  # mean of each named loss per evaluation interval
    steps: int
    seconds: float  # wall time of the optimisation steps (this call; excludes refresh/eval)
    train_images: int  # input images the optimisation steps consumed (this call)
    device: str
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    checkpoint_states: list[tuple[int, dict[str, torch.Tensor]]] = field(default_factory=list)  # (step, weights) when kept

    @property
    def images_per_s(self) -> float:
        return self.train_images / self.seconds if self.seconds > 0 else 0.0


def _param_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def train(
    classifier: Classifier,
    method: Method,
    source: LabelledImages,
    target: UnlabelledImages | None,
    cfg: TrainConfig,
    *,
    steps: int,
    lr: float,
    seed: int,
    validator: str = "im",
    checkpoint_path: Path | None = None,
    description: str = "train",
    source_val: LabelledImages | None = None,
    keep_checkpoints: bool = False,
    auxiliary: bool = False,
    fingerprint: str | None = None,
) -> TrainResult:
    """Run `steps` optimisation steps of `method` on labelled `source` and unlabelled `target`.

    `target` also feeds the label-free validator that picks `selected_state` (every
    `cfg.eval_every` steps, among checkpoints from `method.selection_start(steps)` on). Resumes
    from `checkpoint_path` when it holds a checkpoint written with the same `fingerprint` (what
    produced the run: params, data, code, start weights; see `run_fingerprint`); a checkpoint
    of any other run is set aside with one line saying why. `source_val` (labelled source held out from
    training) adds the DEV score. `keep_checkpoints` keeps every evaluated state, for the
    benchmark's validator study (reported, never selected on). `auxiliary` (adaptation) adds the
    self-supervised task `cfg.rotation_weight` switches on.
    """
    get_validator(validator)  # fail before training on an unknown name
    if validator in SOURCE_AWARE and source_val is None:
        raise ValueError(f"validator '{validator}' needs the labelled source validation set (source_val)")
    device = resolve_device(cfg.device)
    seed_everything(seed, cfg.deterministic, cfg.num_threads)
    classifier.to(device).train()
    method.to(device).train()
    # the self-supervised auxiliary task (auxiliary.py), for adaptation on a target: never in pretraining,
    # whose cached source model must not depend on the target
    rotation = RotationHead(classifier.num_features).to(device) if auxiliary and cfg.rotation_weight > 0 and target is not None else None
    trained = [classifier, method, *([rotation] if rotation is not None else [])]
    optimiser = torch.optim.AdamW(_param_groups(trained, cfg.weight_decay), lr=lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _schedule(cfg.warmup_steps, steps))
    generator = torch.Generator().manual_seed(seed)
    use_target = target is not None and (method.uses_target or method.draws_own_batches)
    source_labels = source.labels

    def source_inputs(idx: torch.Tensor, view: str = "default") -> torch.Tensor:
        return to_input(augment_view(source.images[idx], cfg.augment, generator, view), device)

    def target_inputs(idx: torch.Tensor, view: str = "default") -> torch.Tensor:
        return to_input(augment_view(target.images[idx], cfg.augment, generator, view), device)

    def embed_source(model: Classifier | None = None):
        return predict(model if model is not None else classifier, source.images, device, amp=cfg.amp)

    def embed_target(model: Classifier | None = None):
        return predict(model if model is not None else classifier, target.images, device, amp=cfg.amp)

    start, best_score, best_step, best_state = 0, -math.inf, 0, None
    selectable_from = method.selection_start(steps)  # earlier checkpoints are scored, never selected
    kept: list[tuple[int, dict[str, torch.Tensor]]] = []
    validator_history: list[dict[str, float]] = []
    loss_history: list[dict[str, float]] = []
    ckpt = _resumable(checkpoint_path, fingerprint, description)
    if ckpt is not None:
        classifier.load_state_dict(ckpt["classifier"])
        method.load_state_dict(ckpt["method"])
        method.load_extra_state(ckpt["method_extra"])
        if rotation is not None:
            rotation.load_state_dict(ckpt["rotation"])
        optimiser.load_state_dict(ckpt["optimiser"])
        scheduler.load_state_dict(ckpt["scheduler"])
        generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        start, best_score, best_step = ckpt["step"], ckpt["best_score"], ckpt["best_step"]
        best_state = ckpt["best_state"]
        validator_history, loss_history = ckpt["validator_history"], ckpt["loss_history"]

    def checkpoint(step: int) -> None:
        if checkpoint_path is None:
            return
        _atomic_save(
            {
                "step": step,
                "fingerprint": fingerprint,
                "classifier": classifier.state_dict(),
                "method": method.state_dict(),
                "method_extra": method.extra_state(),
                **({"rotation": rotation.state_dict()} if rotation is not None else {}),
                "optimiser": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "best_score": best_score,
                "best_step": best_step,
                "best_state": best_state,
                "validator_history": validator_history,
                "loss_history": loss_history,
            },
            checkpoint_path,
        )

    sums: dict[str, float] = {}
    count = 0
    seconds, images = 0.0, 0
    with ProgressReport(cfg.progress, description, steps, start) as progress:
        for step in range(start, steps):
            ctx = StepContext(
                step=step, total_steps=steps, batch_size=cfg.batch_size, generator=generator, device=device,
                source_inputs=source_inputs, target_inputs=target_inputs, source_labels=source_labels,
                embed_source=embed_source, embed_target=embed_target, num_target=len(target) if target is not None else 0,
            )
            if method.refresh_every and target is not None and step % method.refresh_every == 0:
                # on resume between refreshes the method's restored extra state (e.g. pairs) is used
                method.refresh(classifier, ctx)
            t0 = time.perf_counter()
            batch = None
            if not method.draws_own_batches:
                s_idx = torch.randint(len(source), (cfg.batch_size,), generator=generator)
                x_t = t_idx = None
                if use_target:
                    t_idx = torch.randint(len(target), (cfg.batch_size,), generator=generator)
                    x_t = target_inputs(t_idx)
                batch = Batch(source_inputs(s_idx), source_labels[s_idx].to(device), x_t, t_idx)
            with _autocast(device, cfg.amp):
                losses = method(classifier, batch, ctx)
                if rotation is not None:
                    t_rot = target_inputs(torch.randint(len(target), (cfg.batch_size,), generator=generator), "weak")
                    rot = rotation_loss(classifier, rotation, t_rot, generator)
                    losses = {**losses, "loss": losses["loss"] + cfg.rotation_weight * rot, "rotation": rot}
            optimiser.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimiser.param_groups for p in g["params"]], cfg.grad_clip)
            optimiser.step()
            scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - t0
            images += method.images_per_step(cfg.batch_size, use_target) + (cfg.batch_size if rotation is not None else 0)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            count += 1
            done = step + 1
            progress.update(done, float(losses["loss"].detach()))
            if done % cfg.eval_every == 0 or done == steps:
                loss_history.append({"step": done, **{k: v / count for k, v in sums.items()}})
                sums, count = {}, 0
                if target is not None:
                    target_features, logits = embed_target()
                    scores = score_all(logits)
                    if source_val is not None:
                        val_features, val_logits = predict(classifier, source_val.images, device, amp=cfg.amp)
                        scores["dev"] = dev_score(val_features, val_logits, source_val.labels, target_features)
                    validator_history.append({"step": done, **scores})
                    if keep_checkpoints:
                        kept.append((done, {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}))
                    if done >= selectable_from and scores[validator] > best_score:
                        best_score, best_step = scores[validator], done
                        best_state = copy.deepcopy({k: v.cpu() for k, v in classifier.state_dict().items()})
            if done % cfg.checkpoint_every == 0 or done == steps:
                checkpoint(done)

    last_state = {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}
    if best_state is None:
        best_state, best_step = last_state, steps
    return TrainResult(
        last_state=last_state,
        selected_state=best_state,
        selected_step=best_step,
        selected_by=validator if target is not None else "last",
        validator_history=validator_history,
        loss_history=loss_history,
        steps=steps,
        seconds=seconds,
        train_images=images,
        device=str(device),
        resumed_from=start,
        extra={"selectable_from": selectable_from},
        checkpoint_states=kept,
    )


def _resumable(path: Path | None, fingerprint: str | None, description: str) -> dict[str, Any] | None:
    """The checkpoint at `path` if it belongs to this run (same fingerprint), else None.

    Tensors and plain containers only (weights_only=True): a checkpoint never runs code when read.
    A checkpoint of another run (other params, data, code or start weights) is never continued:
    it is set aside as `<name>.stale` and the run starts fresh, saying so in one line.
    """
    if path is None or not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated file, pickle payload, foreign format
        _say(f"{description}: {path} is not a readable udaflow checkpoint ({type(exc).__name__}); starting fresh")
        path.replace(path.with_suffix(".stale"))
        return None
    if ckpt.get("fingerprint") != fingerprint:
        _say(f"{description}: {path} was written by another run (params, data, code or start weights differ); starting fresh")
        path.replace(path.with_suffix(".stale"))
        return None
    _say(f"{description}: resuming from step {ckpt['step']} ({path})")
    return ckpt


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class ProgressReport:
    """Training progress a person can follow: a rich bar on a terminal; in a log file or CI output
    (stderr not a terminal) one plain line every `every` of the steps, with the loss and time left."""

    def __init__(self, enabled: bool, description: str, total: int, completed: int = 0, every: float = 0.05):
        self.enabled, self.description, self.total, self.start = enabled, description, total, completed
        self.terminal = enabled and sys.stderr.isatty()
        self.step_lines = max(1, math.ceil(total * every))
        self.t0 = time.perf_counter()
        self.bar = None

    def __enter__(self) -> "ProgressReport":
        if self.terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), transient=True,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task(self.description, total=self.total, completed=self.start)
        elif self.enabled and self.start:
            self._line(f"resumed at step {self.start}/{self.total}")
        return self

    def _line(self, text: str) -> None:
        # written, not print()ed: a Prefect flow with log_prints routes print() to its (quietened) logger
        sys.stderr.write(f"{self.description}: {text}\n")
        sys.stderr.flush()

    def update(self, done: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, description=f"{self.description} loss {loss:.3f}")
        elif self.enabled and (done % self.step_lines == 0 or done == self.total):
            elapsed = time.perf_counter() - self.t0
            left = elapsed / max(1, done - self.start) * (self.total - done)
            self._line(f"{done}/{self.total} steps ({100 * done / self.total:.0f}%), loss {loss:.3f}, {elapsed:.0f}s elapsed, ~{left:.0f}s left")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
