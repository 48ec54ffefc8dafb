"""The one training / evaluation loop, for every method.

The engine owns the optimiser (AdamW, no decay on norms and biases), the schedule (linear warm-up
then cosine), AMP (bf16 autocast on CUDA), checkpoints (atomic, every N steps, resumable to the
same bits on CPU), the label-free checkpoint selection and the progress report. Methods only turn a
batch into named losses.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from udaflow import distributed
from udaflow.auxiliary import RotationHead, rotation_loss
from udaflow.config import AugmentConfig, TrainConfig
from udaflow.data.datasets import LabelledImages, UnlabelledImages
from udaflow.data.store import digest
from udaflow.data.transforms import Draws, RowDraws, augment_view, to_device, to_input
from udaflow.methods.base import Batch, Method, StepContext
from udaflow.models.heads import Classifier
from udaflow.validators import SOURCE_AWARE, dev_score, get_validator, score_all


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"device '{name}' requested but {torch.cuda.device_count()} CUDA GPU(s) are visible (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
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


@contextlib.contextmanager
def _gpu_determinism(device: torch.device, deterministic: bool):
    """On a GPU under train.deterministic, for the training loop: the fused attention kernels whose backward
    can repeat its bits (flash, bf16, and the math fallback: torch warned that cuDNN's and the
    memory-efficient kernel's backward are not deterministic, and picked both for udaflow's ViTs on an
    H200), and torch's deterministic algorithms strictly, not warn-only: flash's backward takes its
    deterministic path only then, and any other operation without one fails loudly instead of changing
    the bits (README, "On a GPU")."""
    if device.type != "cuda" or not deterministic:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
            yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def _keep_heap() -> None:
    """Once per process: glibc keeps the memory a training step frees for the next step.

    By default glibc serves blocks over its (adaptive) mmap threshold with fresh mmaps and returns
    the heap's top to the kernel past its trim threshold, so a CPU step's activations (12.6 MB for
    192 x 16 x 32 x 32 floats of the stem) land on new pages every step, each one faulted in again.
    An mmap threshold at glibc's own maximum (32 MiB) and a trim threshold of 1 GiB keep them in the
    heap. Memory addresses are all it changes: the same bits (tests/unit/test_engine.py). Not glibc
    (musl, macOS): nothing to do."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _cpu_allocation(device: torch.device):
    """On a CPU, for the training loop: no NaN fill of every new tensor, and freed memory kept (`_keep_heap`).

    torch's deterministic mode (train.deterministic) fills each uninitialised tensor before an
    operation writes it (`torch.utils.deterministic.fill_uninitialized_memory`), in case a kernel reads
    what it did not write. The CPU kernels of udaflow's steps write every element of their outputs:
    every method's weights hash the same with and without the fill (docs/measurements.md, "Speed"; a test). On a
    2-core AMD EPYC the fill took 9% of a profiled step's CPU time; without it and without the page
    faults the kept heap avoids, adamatch trains 6.8-8.5% more images a second. A GPU keeps both as
    torch sets them."""
    if device.type != "cpu":
        yield
        return
    import torch.utils.deterministic as deterministic

    _keep_heap()
    was = deterministic.fill_uninitialized_memory
    deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        deterministic.fill_uninitialized_memory = was


# images per forward pass in `predict`: on a CPU a chunk of 128 keeps the activations in cache (the 32 px
# backbones' stem holds 16 x 32 x 32 floats an image): 1.3-1.6x the images/s of 512 on an AMD EPYC, one or
# two threads, the same bits (each image's result does not depend on its chunk); a GPU wants large launches
PREDICT_BATCH = {"cpu": 128}
PREDICT_BATCH_DEFAULT = 512


@torch.no_grad()
def predict(
    classifier: Classifier, images: torch.Tensor, device: torch.device | str = "cpu", batch_size: int | None = None, amp: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) and logits (N, K) on CPU, float32, in eval mode; restores the train/eval mode.
    `batch_size`: images a forward pass (None: `PREDICT_BATCH` for the device type)."""
    device = torch.device(device)
    batch_size = batch_size or PREDICT_BATCH.get(device.type, PREDICT_BATCH_DEFAULT)
    was_training = classifier.training
    classifier.eval()
    feats, logits = [], []
    try:
        for i in range(0, len(images), batch_size):
            x = to_input(images[i : i + batch_size], device, classifier.input_mean, classifier.input_std)
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
    seconds: float  # wall time of the optimisation steps since step 0, a resumed run's calls together (excludes refresh/eval)
    train_images: int  # input images those steps consumed: a resumed run counts what an uninterrupted one does
    device: str
    resumed_from: int = 0  # the step this call started from (a stage file keeps it beside, in its .timing.json)
    extra: dict[str, Any] = field(default_factory=dict)
    checkpoint_states: list[tuple[int, dict[str, torch.Tensor]]] = field(default_factory=list)  # (step, weights) when kept
    # the target pool's logits (N, K) at each kept state, as the validators scored it (label-free); the
    # benchmark's validator study reads them instead of predicting the pool again. Not saved in a stage file.
    checkpoint_logits: list[torch.Tensor] = field(default_factory=list)
    # the last evaluation's, at the last step (the last iterate's weights): `Scored`, for `evaluate_stage` in the same
    # process; None when the run resumed past it. Not saved in a stage file either
    final_scores: "Scored | None" = None

    @property
    def images_per_s(self) -> float:
        return self.train_images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Scored:
    """One set of weights as an evaluation scored them: every label-free validator's score, the target pool's
    logits (N, K) and source val's (or None), with the digests of the images they were predicted from."""

    validators: dict[str, float]
    pool_logits: torch.Tensor
    val_logits: torch.Tensor | None
    pool_digest: str
    val_digest: str | None
    amp: bool  # whether the predictions ran under autocast (bf16 on a GPU; nothing on a CPU)


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


@dataclass
class Record:
    """What a run has measured so far. It is carried from step to step and saved in every checkpoint,
    so a resumed run reports exactly what an uninterrupted one does."""

    validator_history: list[dict[str, float]] = field(default_factory=list)  # step + every validator score, per evaluation
    loss_history: list[dict[str, float]] = field(default_factory=list)  # step + mean of each named loss, per evaluation interval
    best_score: float = -math.inf  # the validator's best score among selectable evaluations
    best_step: int = 0
    best_state: dict[str, torch.Tensor] | None = None  # classifier weights (CPU) at best_step
    kept: list[tuple[int, dict[str, torch.Tensor]]] = field(default_factory=list)  # (step, weights) per evaluation, when kept
    kept_logits: list[torch.Tensor] = field(default_factory=list)  # the target pool's logits at each kept evaluation
    loss_sums: dict[str, float] = field(default_factory=dict)  # the open interval's loss sums: a resume can fall inside one
    loss_count: int = 0  # steps in the open interval
    images: int = 0  # input images the optimisation steps consumed since step 0, every call's
    seconds: float = 0.0  # those steps' seconds, every call's

    def __post_init__(self) -> None:
        # this interval's step losses not yet read: reading a tensor's value waits for the device (on a
        # GPU, every read stalls the host), so they are read in `flush`, where the loop waits anyway
        self._unread: list[dict[str, torch.Tensor]] = []

    def add_losses(self, losses: dict[str, torch.Tensor]) -> None:
        self._unread.append({k: v.detach() for k, v in losses.items()})
        self.loss_count += 1

    def flush(self) -> None:
        """Add the unread step losses to the interval's sums, in step order (the same sums as reading each at once)."""
        for losses in self._unread:
            for k, v in losses.items():
                self.loss_sums[k] = self.loss_sums.get(k, 0.0) + float(v)
        self._unread = []

    def close_loss_interval(self, step: int) -> None:
        self.flush()
        self.loss_history.append({"step": step, **{k: v / self.loss_count for k, v in self.loss_sums.items()}})
        self.loss_sums, self.loss_count = {}, 0

    def add_scores(self, step: int, scores: dict[str, float], logits: torch.Tensor, classifier: Classifier, validator: str,
                   selectable: bool, keep: bool) -> None:
        """Log one evaluation; keep its weights and the pool's `logits` it was scored on when asked;
        remember the weights when the validator prefers them."""
        self.validator_history.append({"step": step, **scores})
        if keep:
            self.kept.append((step, {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}))
            self.kept_logits.append(logits)
        if selectable and scores[validator] > self.best_score:
            self.best_score, self.best_step = scores[validator], step
            self.best_state = copy.deepcopy({k: v.cpu() for k, v in classifier.state_dict().items()})


def _tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in a nested dict / list / tuple (what a checkpoint needs on disk, about)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _why_unwritable(tmp: Path, exc: RuntimeError, needed: int) -> OSError:
    """What torch's writer met, as the OSError it does not raise: a directory in the way, a folder this user
    may not write, a disk with less room than the checkpoint (ENOSPC, which the CLI reports in one line)."""
    import errno
    import re
    import shutil

    def error(code: int, text: str | None = None) -> OSError:
        return OSError(code, text or os.strerror(code), str(tmp))

    if tmp.is_dir():
        return error(errno.EISDIR)
    if not os.access(tmp.parent, os.W_OK):
        return error(errno.EACCES)
    try:
        if shutil.disk_usage(tmp.parent).free < needed:
            return error(errno.ENOSPC)
    except OSError:
        pass
    said = re.search(r"strerror: ([^\n]+)", str(exc))
    return error(errno.EIO, said.group(1).strip() if said else " ".join(str(exc).split())[:200])


@dataclass
class Checkpoint:
    """A resume point: everything a killed run needs to continue to the same bits, and which run wrote it.

    Saved as one file of tensors and plain containers, written atomically (a kill mid-write leaves the
    previous checkpoint) and read with weights_only=True (reading one never runs code). `save` and
    `load` are the only places a checkpoint is written or read.
    """

    FORMAT: ClassVar[int] = 2  # 1: the loose 13-key dict of udaflow before this class

    step: int  # optimisation steps done
    fingerprint: str | None  # what produced the run (experiment.run_fingerprint); resumed only under the same one
    weights: dict[str, dict[str, torch.Tensor]]  # state_dict of each trained module: classifier, method, rotation (when on)
    method_extra: dict[str, Any]  # method.extra_state(): what a method keeps outside its parameters (pairs, class status)
    optimiser: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor]  # the batch generator's state and torch's global CPU state
    record: Record

    @classmethod
    def capture(cls, step: int, fingerprint: str | None, modules: dict[str, torch.nn.Module], method: Method,
                optimiser: torch.optim.Optimizer, scheduler: Any, generator: torch.Generator, record: Record) -> Checkpoint:
        """The live run at `step`; it shares tensors with the modules, so save it at once."""
        return cls(
            step=step, fingerprint=fingerprint, weights={name: m.state_dict() for name, m in modules.items()},
            method_extra=method.extra_state(), optimiser=optimiser.state_dict(), scheduler=scheduler.state_dict(),
            rng={"generator": generator.get_state(), "torch": torch.get_rng_state()}, record=record,
        )

    def restore(self, modules: dict[str, torch.nn.Module], method: Method, optimiser: torch.optim.Optimizer, scheduler: Any,
                generator: torch.Generator) -> Record:
        """Put the saved state back into the live run; returns the record to carry on."""
        for name, module in modules.items():
            module.load_state_dict(self.weights[name])
        method.load_extra_state(self.method_extra)
        optimiser.load_state_dict(self.optimiser)
        scheduler.load_state_dict(self.scheduler)
        generator.set_state(self.rng["generator"])
        torch.set_rng_state(self.rng["torch"])
        return self.record

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.record.flush()  # the step losses not yet read, into the sums the checkpoint carries
        saved = {f.name: getattr(self, f.name) for f in fields(self)}
        saved["record"] = {f.name: getattr(self.record, f.name) for f in fields(self.record)}
        tmp = path.with_name(path.name + ".tmp")
        payload = {"format": self.FORMAT, **saved}
        try:  # to the path, as C++ writes it: through a Python file a Ctrl-C in its write() came out as a RuntimeError
            torch.save(payload, tmp)
        except RuntimeError as exc:  # torch's writer names no file: "unexpected pos 704 vs 598" on a full disk
            if tmp.is_file():
                tmp.unlink()
            cause = _why_unwritable(tmp, exc, _tensor_bytes(payload))  # the CLI says a full disk in one line, with the file
            error = RuntimeError(f"{tmp}: the resume checkpoint could not be written ({cause.strerror})")
            error.hint = (f"make {tmp} writable (a file, not a directory, in a folder this user may write), or point "
                          "work_dir elsewhere; then run the same command again: it resumes from the previous checkpoint")
            raise error from cause
        os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact

    @classmethod
    def load(cls, path: Path | None, fingerprint: str | None, description: str, main: bool = True) -> Checkpoint | None:
        """The checkpoint at `path` if this run wrote it (same fingerprint), else None.

        Anything else there (another run's checkpoint, an older udaflow's, a truncated file, a
        pickle payload) is never continued: it is set aside as `<name>.stale` and the run starts
        fresh, saying why in one line.
        """
        if path is None or not path.exists():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(saved, dict) or saved.get("format") != cls.FORMAT:
                return _set_aside(path, description, "was written by an older udaflow (another checkpoint format)", main)
            if saved.get("fingerprint") != fingerprint:
                return _set_aside(path, description, "was written by another run (params, data, code or start weights differ)", main)
            ckpt = cls(**{f.name: saved[f.name] for f in fields(cls) if f.name != "record"}, record=Record(**saved["record"]))
        except Exception as exc:  # noqa: BLE001 - truncated file, pickle payload, foreign format
            return _set_aside(path, description, f"is not a readable udaflow checkpoint ({type(exc).__name__})", main)
        ckpt.record.kept = [tuple(pair) for pair in ckpt.record.kept]
        # a live run's history keys are its code's string literals, one interned object each; unpickled ones are
        # copies, which a stage file then pickles beside the live ones: other bytes (another DVC hash), same content
        record = ckpt.record
        record.loss_history = [{sys.intern(k): v for k, v in row.items()} for row in record.loss_history]
        record.validator_history = [{sys.intern(k): v for k, v in row.items()} for row in record.validator_history]
        record.loss_sums = {sys.intern(k): v for k, v in record.loss_sums.items()}
        if main:
            _say(f"{description}: resuming from step {ckpt.step} ({path})")
        return ckpt


def _set_aside(path: Path, description: str, why: str, main: bool = True) -> None:
    if main:  # under torchrun the other ranks only read
        _say(f"{description}: {path} {why}; starting fresh")
        path.replace(path.with_suffix(".stale"))
    return None


@dataclass
class _Domain:
    """One domain's images as the loop and the methods see them: augmented inputs of a batch, or
    the current model's features and logits of every image."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    classifier: Classifier
    augment: AugmentConfig
    generator: torch.Generator
    device: torch.device
    amp: bool

    def inputs(self, idx: torch.Tensor, view: str = "default") -> torch.Tensor:
        """Normalised inputs of images[idx] in a view (weak | default | strong): (B, 3, H, W), or under
        torchrun this rank's rows of them, augmented with the numbers drawn for the whole batch (RowDraws):
        each rank augments and copies only its own rows, the pixels one process gives them."""
        draws: Draws = self.generator
        if distributed.active():
            rows = distributed.share(len(idx))
            idx, draws = idx[rows], RowDraws(self.generator, len(idx), rows)
        images = to_device(self.images[idx], self.device)  # augmented where it trains: uint8 over the bus, the arithmetic there
        x = augment_view(images, self.augment, draws, view)
        return to_input(x, self.device, self.classifier.input_mean, self.classifier.input_std)

    def embed(self, model: Classifier | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, D) and logits (N, K) of every image, from `model` (e.g. an EMA teacher) or the trained
        classifier; under torchrun each rank embeds its share and all ranks get all rows."""
        model = model if model is not None else self.classifier
        return distributed.gather_rows(len(self.images), lambda rows: predict(model, self.images[rows], self.device, amp=self.amp))


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
    main = distributed.is_main()  # under torchrun only rank 0 checkpoints and reports
    if distributed.active():
        distributed.sync_batchnorm_(classifier)
        distributed.sync_batchnorm_(method)
    classifier.to(device).train()
    method.to(device).train()
    if cfg.compile:
        classifier.backbone.compile()  # in place: parameters and state_dict keys unchanged
    # the self-supervised auxiliary task (auxiliary.py), for adaptation on a target: never in pretraining,
    # whose cached source model must not depend on the target
    rotation = RotationHead(classifier.num_features).to(device) if auxiliary and cfg.rotation_weight > 0 and target is not None else None
    rotation_batch = cfg.rotation_batch or cfg.batch_size
    rotation_from_source = round(rotation_batch * cfg.rotation_source)  # Sun et al. 2019 train the task on both domains
    modules = {"classifier": classifier, "method": method, **({"rotation": rotation} if rotation is not None else {})}
    # foreach: one kernel per update over all tensors, as torch picks on a GPU; on a CPU torch's default is a loop
    # over the 56+ tensors, 0.5 ms more a step (the same bits: tests/unit/test_engine.py)
    optimiser = torch.optim.AdamW(_param_groups(list(modules.values()), cfg.weight_decay), lr=lr, betas=(0.9, 0.999), foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _schedule(cfg.warmup_steps, steps))
    generator = torch.Generator().manual_seed(seed)
    start, record, final = 0, Record(), None
    ckpt = Checkpoint.load(checkpoint_path, fingerprint, description, main)
    if ckpt is not None:
        start, record = ckpt.step, ckpt.restore(modules, method, optimiser, scheduler, generator)

    src = _Domain(source.images, classifier, cfg.augment, generator, device, cfg.amp)
    tgt = _Domain(target.images, classifier, cfg.augment, generator, device, cfg.amp) if target is not None else None
    use_target = tgt is not None and (method.uses_target or method.draws_own_batches)
    context = StepContext(
        step=start, total_steps=steps, batch_size=cfg.batch_size, generator=generator, device=device,
        source_inputs=src.inputs, target_inputs=tgt.inputs if tgt is not None else None, source_labels=source.labels,
        embed_source=src.embed, embed_target=tgt.embed if tgt is not None else None, num_target=len(target) if target is not None else 0,
    )
    selectable_from = method.selection_start(steps)  # earlier checkpoints are scored, never selected
    with (
        ProgressReport(cfg.progress and main, description, steps, start) as progress,
        _gpu_determinism(device, cfg.deterministic),
        _cpu_allocation(device),
    ):
        for step in range(start, steps):
            ctx = replace(context, step=step)
            if method.refresh_every and tgt is not None and step % method.refresh_every == 0:
                # on resume between refreshes the method's restored extra state (e.g. pairs) is used
                method.refresh(classifier, ctx)
            t0 = time.perf_counter()
            batch = None if method.draws_own_batches else _draw_batch(src, tgt if use_target else None, source.labels, cfg.batch_size, generator)
            with _autocast(device, cfg.amp):
                losses = method(classifier, batch, ctx)
                if rotation is not None:
                    x_rot, quarters = [], []
                    for domain, n in ((src, rotation_from_source), (tgt, rotation_batch - rotation_from_source)):
                        if n:  # the source share first (none by default), then the target's
                            x_rot.append(domain.inputs(torch.randint(len(domain.images), (n,), generator=generator), "weak"))
                            quarters.append(distributed.shard(torch.randint(4, (n,), generator=generator)))
                    rot = rotation_loss(classifier, rotation, torch.cat(x_rot), torch.cat(quarters))
                    losses = {**losses, "loss": losses["loss"] + cfg.rotation_weight * rot, "rotation": rot}
            optimiser.zero_grad(set_to_none=True)
            losses["loss"].backward()
            trained = [p for g in optimiser.param_groups for p in g["params"]]
            distributed.average_gradients(trained)
            torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
            optimiser.step()
            scheduler.step()
            done = step + 1
            evaluate = done % cfg.eval_every == 0 or done == steps
            checkpoint = main and checkpoint_path is not None and (done % cfg.checkpoint_every == 0 or done == steps)
            show_loss = progress.wants_loss(done)
            if device.type == "cuda" and (evaluate or checkpoint or show_loss or (method.refresh_every and done % method.refresh_every == 0)):
                # the host runs ahead of the GPU between these steps; here it waits, so `seconds` counts the
                # queued steps' GPU time before anything outside training (evaluation, checkpoint, refresh) runs
                torch.cuda.synchronize(device)
            record.seconds += time.perf_counter() - t0
            record.images += method.images_per_step(cfg.batch_size, use_target) + (rotation_batch if rotation is not None else 0)
            record.add_losses(distributed.mean_over_ranks(losses))
            progress.update(done, float(losses["loss"].detach()) if show_loss else None)
            if evaluate:
                record.close_loss_interval(done)
                if tgt is not None:
                    scores, logits, val_logits = _scores(tgt, classifier, source_val, device, cfg.amp)
                    record.add_scores(done, scores, logits, classifier, validator, done >= selectable_from, keep_checkpoints)
                    if done == steps:
                        final = Scored(dict(scores), logits, val_logits, digest(target.images),
                                       digest(source_val.images) if source_val is not None else None, cfg.amp)
            if checkpoint:
                Checkpoint.capture(done, fingerprint, modules, method, optimiser, scheduler, generator, record).save(checkpoint_path)

    distributed.unsync_batchnorm_(classifier)
    distributed.unsync_batchnorm_(method)
    last_state = {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}
    return TrainResult(
        last_state=last_state,
        selected_state=record.best_state if record.best_state is not None else last_state,
        selected_step=record.best_step if record.best_state is not None else steps,
        selected_by=validator if target is not None else "last",
        validator_history=record.validator_history,
        loss_history=record.loss_history,
        steps=steps,
        seconds=record.seconds,
        train_images=record.images,
        device=str(device),
        resumed_from=start,
        extra={"selectable_from": selectable_from},
        checkpoint_states=record.kept,
        checkpoint_logits=record.kept_logits,
        final_scores=final,
    )


def _draw_batch(source: _Domain, target: _Domain | None, source_labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> Batch:
    """B random source images with their labels and, when the method trains on it, B random target images."""
    s_idx = torch.randint(len(source.images), (batch_size,), generator=generator)
    x_t = t_idx = None
    if target is not None:
        t_idx = torch.randint(len(target.images), (batch_size,), generator=generator)
        x_t = target.inputs(t_idx)
        t_idx = distributed.shard(t_idx)
    return Batch(source.inputs(s_idx), distributed.shard(source_labels[s_idx]).to(source.device), x_t, t_idx)


def _scores(
    target: _Domain, classifier: Classifier, source_val: LabelledImages | None, device: torch.device, amp: bool,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor | None]:
    """Every label-free validator's score of the current classifier (DEV when labelled source validation
    data is given), the target pool's logits (N, K) they read, and source val's (or None)."""
    target_features, logits = target.embed()
    scores = score_all(logits)
    val_logits = None
    if source_val is not None:
        val_features, val_logits = distributed.gather_rows(len(source_val.images), lambda rows: predict(classifier, source_val.images[rows], device, amp=amp))
        scores["dev"] = dev_score(val_features, val_logits, source_val.labels, target_features)
    return scores, logits, val_logits


def _say(line: str) -> None:
    # a bench worker's tag too (`plain_progress`): its resume line came untagged among two cells' lines
    sys.stderr.write(f"{_PLAIN_PROGRESS or ''}{line}\n")
    sys.stderr.flush()


_PLAIN_PROGRESS: str | None = None


def plain_progress(tag: str = "") -> None:
    """This process reports progress in plain lines even on a terminal, each starting with `tag` (a
    bench worker: several processes share the terminal, and their live bars would overwrite each other)."""
    global _PLAIN_PROGRESS
    _PLAIN_PROGRESS = tag


class ProgressReport:
    """Training progress a person can follow: a rich bar on a terminal; in a log file or CI output
    (stderr not a terminal) one plain line every `every` of the steps, with the loss and time left."""

    def __init__(self, enabled: bool, description: str, total: int, completed: int = 0, every: float = 0.05):
        self.enabled, self.description, self.total, self.start = enabled, description, total, completed
        self.terminal = enabled and sys.stderr.isatty() and _PLAIN_PROGRESS is None
        self.step_lines = max(1, math.ceil(total * every))
        self.t0 = self.loss_shown = time.perf_counter()
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
        sys.stderr.write(f"{_PLAIN_PROGRESS or ''}{self.description}: {text}\n")
        sys.stderr.flush()

    def wants_loss(self, done: int) -> bool:
        """Whether `update(done, ...)` shows the loss: a plain line is due, or the bar's loss is half a second
        old (reading the loss waits for the device, so it is not read every step)."""
        if self.bar is not None:
            return done == self.total or time.perf_counter() - self.loss_shown >= 0.5
        return self.enabled and (done % self.step_lines == 0 or done == self.total)

    def update(self, done: int, loss: float | None) -> None:
        """`loss` is given when `wants_loss(done)` said so."""
        if self.bar is not None:
            if loss is None:
                self.bar.update(self.task, completed=done)
            else:
                self.loss_shown = time.perf_counter()
                self.bar.update(self.task, completed=done, description=f"{self.description} loss {loss:.3f}")
        elif loss is not None:
            elapsed = time.perf_counter() - self.t0
            left = elapsed / max(1, done - self.start) * (self.total - done)
            self._line(f"{done}/{self.total} steps ({100 * done / self.total:.0f}%), loss {loss:.3f}, {elapsed:.0f}s elapsed, ~{left:.0f}s left")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
