"""The pipeline's steps as plain functions: pretrain on the source, adapt to the target, evaluate.

`udaflow run`, `udaflow bench` (and the Prefect tasks that wrap them) call these; each is one
step of the sentence "pretrain on the labelled source, adapt to the unlabelled target, evaluate".
Source pretraining is cached on disk, keyed on the source manifest's content and every parameter
that shapes the source model, so methods of one shift share it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from udaflow import distributed
from udaflow.config import Config
from udaflow.data.datasets import LabelledImages, ShiftData, UnlabelledImages
from udaflow.data.manifest import MANIFEST_NAME
from udaflow.data.store import digest
from udaflow.locks import exclusive
from udaflow.engine import Record, Scored, TrainResult, peak_rss_mb, predict, resolve_device, seed_everything, train
from udaflow.methods import create_method, get_method_class
from udaflow.models import Classifier, build_classifier
from udaflow.models.backbone import weights_digest
from udaflow.models.preprocess import ImageSpec
from udaflow.models.preprocess import resolve as resolve_preprocessing
from udaflow.validators import dev_score, score_all


def image_spec(cfg: Config) -> ImageSpec:
    """Input size, resize/crop and normalisation: the backbone's timm pretrained config, else data.image_size."""
    return resolve_preprocessing(cfg.model.backbone, cfg.model.backbone_args, cfg.data.image_size)


def new_classifier(cfg: Config, num_classes: int) -> Classifier:
    return build_classifier(cfg.model.backbone, num_classes, cfg.model.pretrained, **cfg.model.backbone_args)


def source_params(cfg: Config, num_classes: int) -> dict:
    """Every parameter the source model depends on (not the adaptation ones)."""
    adaptation_only = ("adapt_steps", "adapt_lr", "rotation_weight", "rotation_batch", "rotation_source", "pseudo_labels", "swap_retries",
                       "progress", "checkpoint_every")
    # the strong view's warp is adaptation's too: pretraining reads the default view only
    exclude = {**dict.fromkeys(adaptation_only, True), "augment": {"strong_rotate", "strong_shear"}}
    train_cfg = cfg.train.model_dump(mode="json", exclude=exclude)
    # kept: device, num_threads and amp change the bits (kernels), eval_every the stored selection history,
    # nproc > 1 (float rounding of the reductions over ranks);
    # left out: adaptation-only fields (the strong view's warp among them), the progress display, and checkpoint_every (resume is bit-identical)
    if train_cfg.get("nproc") == 1:
        del train_cfg["nproc"]  # one process: the key of the source models cached before nproc existed
    return {
        "model": cfg.model.model_dump(mode="json"),
        "train": train_cfg,
        "image_size": image_spec(cfg).size,
        **({"preprocess": image_spec(cfg).variant} if image_spec(cfg).variant else {}),
        # the file's content, not only its path (in `model`): other weights saved under the same name train another model
        **({"pretrained_sha256": digest} if (digest := weights_digest(cfg.model.pretrained)) else {}),
        "source_only": cfg.methods.get("source_only", {}),
        "num_classes": num_classes,
        "seed": cfg.seed,
    }


def source_cache_key(cfg: Config, source: str, num_classes: int) -> str:
    """Content hash of the source manifest + every parameter the source model depends on + udaflow's code."""
    manifest = (cfg.data.root / source / MANIFEST_NAME).read_bytes()
    # format 4: tensors-only stage files, device / threads / amp / eval_every in the key (older caches are not reused);
    # 5: images decoded upright by their EXIF orientation (a source model trained on turned photos is not reused).
    # The code too: `dvc repro` re-runs pretraining after a code change (dvc.yaml), and must not get the old code's model back
    shaping = {"format": 5, "manifest": hashlib.sha256(manifest).hexdigest(), "code": code_digest(), **source_params(cfg, num_classes)}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of udaflow's own code (every .py file under src/udaflow, with its path), as this process loaded it."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(path.relative_to(Path(__file__).parent).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@dataclass
class StageResult:
    """A trained classifier (last iterate) plus what the engine measured."""

    classifier: Classifier
    train: TrainResult
    wall_seconds: float
    cached: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def save_stage(path: Path, result: TrainResult, wall_seconds: float, classes: tuple[str, ...]) -> None:
    """Write a trained stage atomically: weights and histories in `path`, wall times (and the step a
    resumed run started from) in `<path>.timing.json`.

    Timings vary from run to run; everything in `path` is decided by data, code and parameters, so
    a deterministic CPU run writes it byte for byte again (its DVC hash in dvc.lock stays put).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    timing = path.with_suffix(".timing.json")
    timing.write_text(json.dumps({"seconds": result.seconds, "wall_seconds": wall_seconds, "resumed_from": result.resumed_from}) + "\n")
    tmp = path.with_suffix(".tmp")  # same stem: torch.save names the archive inside after the file
    # tensors and plain containers only: reading a stage (a DVC output, pulled from a remote) never runs code
    fields_ = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    fields_["seconds"] = 0.0
    fields_["resumed_from"] = 0  # where a killed run resumed is not what the stage is: a resumed run writes the same bytes
    # the pool's logits are the scoring target's: a cached source model serves every target. Left out, the
    # file also keeps the bytes its DVC hash in dvc.lock records
    fields_.pop("checkpoint_logits")
    fields_.pop("final_scores")  # the same: the scored pool's, kept for this process's evaluation
    torch.save({"result": fields_, "classes": list(classes)}, tmp)
    tmp.replace(path)


def load_stage(path: Path) -> tuple[TrainResult, float, tuple[str, ...]]:
    """(train result, wall seconds, classes) of a stage `save_stage` wrote; timings are 0 when their file is gone."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a pickle payload, an old pickled stage, a truncated file
        raise ValueError(f"{path}: not a udaflow stage file of tensors and plain values ({type(exc).__name__}); "
                         "nothing in it was run. Re-create it (dvc repro, or udaflow run)") from None
    timing_file = path.with_suffix(".timing.json")
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {"seconds": 0.0, "wall_seconds": 0.0}
    result = TrainResult(**{**saved["result"], "seconds": timing["seconds"], "resumed_from": timing.get("resumed_from", 0)})
    result.checkpoint_states = [tuple(pair) for pair in result.checkpoint_states]
    return result, timing["wall_seconds"], tuple(saved["classes"])


def run_fingerprint(cfg: Config, method_name: str, start: torch.nn.Module, *datasets: LabelledImages | UnlabelledImages,
                    params: dict | None = None) -> str:
    """What produced a training run, hashed: the resolved params (all but the progress display; or
    `params`, those the run depends on), the method, the content of every dataset it reads, the start
    weights and udaflow's own code.

    A checkpoint resumes only under the same fingerprint (engine.train), so a re-run with other
    params, new data or other code never continues old weights under new tags.
    """
    h = hashlib.sha256()
    if params is None:
        params = cfg.model_dump(mode="json")
        params["train"].pop("progress", None)
    h.update(json.dumps({"params": params, "method": method_name}, sort_keys=True, default=str).encode())
    for data in datasets:
        h.update(data.domain.encode())
        h.update(digest(data.images).encode())  # the pixels' content (a file of rows is named by it)
        if isinstance(data, LabelledImages):
            h.update(data.labels.numpy().tobytes())
            h.update(json.dumps(list(data.classes)).encode())
    for name, value in sorted(start.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    h.update(code_digest().encode())  # the code that trains
    return h.hexdigest()[:16]


def pretrain_source(cfg: Config, data: ShiftData, source: str, cache_dir: Path | None = None) -> StageResult:
    """Supervised source training; reuses a cached result for the same source content and params.

    The unlabelled target pool is passed only to score checkpoints with the label-free validator.
    """
    cache = source_cache_path(cfg, source, len(data.classes), cache_dir)
    if distributed.active():  # a torchrun rank: the process that launched the ranks holds the lock
        return _pretrain_source(cfg, data, source, cache)
    with source_lock(cache, source):
        return _pretrain_source(cfg, data, source, cache)


def source_cache_path(cfg: Config, source: str, num_classes: int, cache_dir: Path | None = None) -> Path:
    """The cache file of the source model `cfg` trains on `source` (`source_cache_key`)."""
    return Path(cache_dir or cfg.work_dir / "cache") / f"source-{source}-{source_cache_key(cfg, source, num_classes)}.pt"


def source_lock(cache: Path, source: str):
    """Held while a source model is trained or read from `cache`. Two runs needing it at once (two
    shifts of one source, a bench's workers, a bench beside a run) each set the other's live
    checkpoint aside and both trained it from step 0; now the second waits, then reuses it."""
    return exclusive(cache.with_suffix(".lock"), f"another udaflow process training source model '{source}'")


def _pretrain_source(cfg: Config, data: ShiftData, source: str, cache: Path) -> StageResult:
    # seeded before any module is built, so the initial weights never depend on what ran before
    seed_everything(cfg.seed, cfg.train.deterministic, cfg.train.num_threads)
    classifier = new_classifier(cfg, len(data.classes))
    key = cache.stem.rsplit("-", 1)[1]
    if cache.exists():
        try:
            result, wall, classes = load_stage(cache)
            if classes != tuple(data.classes):  # the key counts classes; their order is the output units' meaning
                raise ValueError(f"{cache}: its classes {list(classes)} are not the source's {list(data.classes)} in order")
        except ValueError as exc:  # an older pickled cache entry, or a tampered one: never unpickled, retrained
            print(f"pretrain {source}: {exc}; training the source model again", file=sys.stderr)
        else:
            classifier.load_state_dict(result.last_state)
            return StageResult(classifier, result, wall, cached=True, info={"cache": str(cache), "key": key})
    t0 = time.perf_counter()
    method = create_method("source_only", classifier, cfg.methods.get("source_only"))
    result = train(
        classifier, method, data.source_train, data.target_adapt, cfg.train,
        steps=cfg.train.pretrain_steps, lr=cfg.train.lr, seed=cfg.seed, validator=cfg.validator,
        checkpoint_path=cache.with_suffix(".ckpt"), description=f"pretrain {source}",
        # scored checkpoints are kept in the cache (a few MB) so any later bench can study the validators
        source_val=data.source_val, keep_checkpoints=True,
        fingerprint=source_fingerprint(cfg, classifier, data),
    )
    wall = time.perf_counter() - t0
    if distributed.is_main():  # under torchrun rank 0 alone writes
        save_stage(cache, result, wall, data.classes)
        _save_scored_pool(cache, cfg, data, result)
        cache.with_suffix(".ckpt").unlink(missing_ok=True)
    return StageResult(classifier, result, wall, info={"cache": str(cache), "key": key})


def source_fingerprint(cfg: Config, start: torch.nn.Module, data: ShiftData) -> str:
    """The pretraining's resume fingerprint: the params the source model depends on (`source_params`)
    and the validator that keeps its pick, not the whole config. A run killed while pretraining and
    started again with another adaptation setting (adapt_steps, the method) resumes the pretraining;
    it used to set the checkpoint aside and pretrain from step 0. The target pool stays in: it scores
    the checkpoints."""
    params = {**source_params(cfg, len(data.classes)), "validator": cfg.validator}
    return run_fingerprint(cfg, "source_only", start, data.source_train, data.target_adapt, data.source_val, params=params)


def _scored_pool_path(cache: Path) -> Path:
    return cache.with_suffix(".pool")  # not *.pt: a cache folder's source models stay `source-*.pt` alone


def _scored_pool_key(cfg: Config, data: ShiftData) -> dict[str, Any]:
    return {"pool": digest(data.target_adapt.images), "source_val": digest(data.source_val.images) if data.source_val is not None else None,
            "validator": cfg.validator, "amp": bool(cfg.train.amp)}


def _save_scored_pool(cache: Path, cfg: Config, data: ShiftData, result: TrainResult) -> None:
    """Beside a cached source model: the pool its checkpoints were scored on (digests), and their logits there (a
    few MB). `rescore_on_pool` on that same pool then reads them instead of predicting it with every checkpoint again."""
    path = _scored_pool_path(cache)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**_scored_pool_key(cfg, data), "validator_history": result.validator_history, "logits": result.checkpoint_logits}, tmp)
    tmp.replace(path)


def _scored_here_before(cfg: Config, stage: StageResult, data: ShiftData) -> list[torch.Tensor] | None:
    """The kept checkpoints' pool logits `_save_scored_pool` wrote, when the cached stage was scored and selected on
    this pool, with this source val, validator and autocast (so its history is what rescoring computes), else None."""
    cache = stage.info.get("cache")
    path = _scored_pool_path(Path(cache)) if cache else None
    if path is None or not path.is_file() or stage.train.selected_by != cfg.validator:
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a truncated or foreign file: rescored, as without it
        return None
    key = _scored_pool_key(cfg, data)
    if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in key.items()):
        return None
    logits = saved.get("logits")
    if saved.get("validator_history") != stage.train.validator_history or not isinstance(logits, list) or len(logits) != len(stage.train.checkpoint_states):
        return None
    return logits


def rescore_on_pool(cfg: Config, stage: StageResult, data: ShiftData) -> StageResult:
    """A cached source model scored again on `data`'s target pool (label-free), its checkpoint chosen again.

    A source model is cached per source (`source_cache_key`) and serves every target. Its validator
    history and selected checkpoint come from the target pool that first trained it; for any other
    target they describe another domain. This predicts the pool with every kept checkpoint, rebuilds
    the history with the scores training computes (`pool_scores`, as `engine._scores`: every validator,
    DEV with source val) and lets `cfg.validator` choose with the engine's own `Record` (the first best among selectable
    evaluations). The pool's logits are kept with the states, so the bench's validator study reads
    them. Adaptation starts from the last iterate, which no pool touches."""
    result = stage.train
    if not result.checkpoint_states:
        return stage
    kept = _scored_here_before(cfg, stage, data)
    if kept is not None:  # scored on this pool when it was trained: the same scores, the same pick (12 s of a bench cell)
        return dataclasses.replace(stage, train=dataclasses.replace(result, checkpoint_logits=kept))
    device = resolve_device(cfg.train.device)
    classifier = stage.classifier.to(device)
    selectable_from = result.extra.get("selectable_from", 0)
    record, logits_kept = Record(), []  # the engine's own bookkeeping picks, as in training
    for step, state in result.checkpoint_states:
        classifier.load_state_dict(state)
        scores, logits, _ = pool_scores(classifier, data, device, amp=cfg.train.amp)
        record.add_scores(step, scores, logits, classifier, cfg.validator, step >= selectable_from, keep=False)
        logits_kept.append(logits)
    classifier.load_state_dict(result.last_state)
    picked = record.best_state is not None
    rescored = dataclasses.replace(
        result, validator_history=record.validator_history, checkpoint_logits=logits_kept, selected_by=cfg.validator,
        selected_step=record.best_step if picked else result.steps, selected_state=record.best_state if picked else result.last_state,
    )
    return dataclasses.replace(stage, train=rescored)


# an adaptation run again after a flagged swap draws from seed + 1 + attempt x this: far from the seeds a bench's seeds use
RETRY_SEED_STRIDE = 1000


def adapt_to_target(
    cfg: Config,
    method_name: str,
    source_model: StageResult,
    source_train: LabelledImages,
    target_adapt: UnlabelledImages,
    checkpoint_path: Path | None = None,
    source_val: LabelledImages | None = None,
    keep_checkpoints: bool = False,
) -> StageResult:
    """Adapt a copy of the source model with `method_name` on labelled source + unlabelled target.

    With `train.swap_retries` = n > 0 and labelled `source_val`, the adapted model's labels on the pool are
    read in the source model's features (`shift.class_swaps`, the check the promotion gate applies): when a
    pair of classes looks swapped, adaptation runs again from the source model with another seed
    (seed + 1 + attempt x RETRY_SEED_STRIDE), at most n times. Self-training locks a swap in early and
    keeps it (docs/measurements.md, "A fourth shift"); a fresh draw of batches need not. The last attempt
    is the result; `train.extra["swap_retries"]` lists the attempts set aside (seed, pairs, seconds), and
    `wall_seconds` counts them all. Each attempt has a checkpoint of its own (`retry_checkpoint`).
    A run the check never flags trains and returns exactly what it did without the check.
    """
    cls = get_method_class(method_name)
    if cls.uses_target_labels:
        raise ValueError(f"method '{method_name}' trains on target labels: benchmark only (`udaflow bench`), never registered")
    t0 = time.perf_counter()
    reference, set_aside = None, []
    retries = cfg.train.swap_retries if source_val is not None else 0
    for attempt in range(retries + 1):
        seed = cfg.seed + 1 + attempt * RETRY_SEED_STRIDE
        seed_everything(seed, cfg.train.deterministic, cfg.train.num_threads)  # the method's own modules too
        classifier = new_classifier(cfg, len(source_train.classes))
        classifier.load_state_dict(source_model.train.last_state)
        fingerprint = run_fingerprint(cfg, method_name, classifier, source_train, target_adapt, *([source_val] if source_val is not None else []))
        if attempt:
            fingerprint = hashlib.sha256(f"{fingerprint} retry {attempt}".encode()).hexdigest()[:16]
        method = create_method(method_name, classifier, cfg.methods.get(method_name), cfg.train.pseudo_labels.model_dump())
        result = train(
            classifier, method, source_train, target_adapt, cfg.train,
            steps=method.adapt_steps(cfg.train.adapt_steps), lr=cfg.train.adapt_lr, seed=seed, validator=cfg.validator,
            checkpoint_path=retry_checkpoint(checkpoint_path, attempt), description=f"adapt {method_name}" + (f" (retry {attempt})" if attempt else ""),
            source_val=source_val, keep_checkpoints=keep_checkpoints, auxiliary=True, fingerprint=fingerprint,
        )
        if attempt == retries:
            break
        from udaflow.shift import class_swaps

        device, model = resolve_device(cfg.train.device), copy.deepcopy(classifier)  # a copy draws no random numbers
        if reference is None:  # the source model's features of source val and the pool, as the gate's check reads them
            model.load_state_dict(source_model.train.last_state)
            reference = (predict(model, source_val.images, device)[0], source_val.labels, predict(model, target_adapt.images, device)[0])
        model.load_state_dict(result.selected_state)  # the weights the pipeline registers
        swaps = class_swaps(*reference, predict(model, target_adapt.images, device)[1].argmax(1), len(source_train.classes))
        if not swaps:
            break
        names = ", ".join(f"{source_train.classes[a]}<->{source_train.classes[b]}" for a, b in swaps)
        set_aside.append({"seed": seed, "class_swaps": [[source_train.classes[a], source_train.classes[b]] for a, b in swaps],
                          "seconds": round(result.seconds, 2)})
        if distributed.is_main():
            print(f"adapt {method_name}: classes {names} look swapped on the target pool (their labels there sit nearer the other's "
                  f"source images in the source model's features): adapting again from the source model, seed "
                  f"{seed + RETRY_SEED_STRIDE} (retry {attempt + 1} of {retries})", file=sys.stderr, flush=True)
    if retries:
        result.extra["swap_retries"] = set_aside
    return StageResult(classifier, result, time.perf_counter() - t0)


def retry_checkpoint(path: Path | None, attempt: int) -> Path | None:
    """The resume point of adaptation attempt `attempt` (0: `path` itself; n: checkpoint.retry<n>.pt beside it)."""
    return path if path is None or attempt == 0 else path.with_name(f"{path.stem}.retry{attempt}{path.suffix}")


def train_oracle(cfg: Config, source_model: StageResult, target_train_labelled: LabelledImages) -> StageResult:
    """The upper bound: fine-tune the source model on labelled target-train. Benchmark only.

    It trains with the recipe every adaptation method trains with, target labels in place of source
    labels: the same steps, learning rate, views and the self-supervised rotation task
    (`train.rotation_weight`). The rotation task and the label-free checkpoint choice read the same
    target-train images, without their labels: the oracle never sees a target test image, not even
    unlabelled. Until 2026-12-01 it trained without the task that every other row trains with; with
    it (`udaflow_vit_tiny2`, seed 0) mnistm 96.40 -> 97.00 and mnist 98.10 -> 98.60; 3 seeds 96.90 +- 0.26
    and 98.53 +- 0.06 (docs/measurements.md, "Backbone ceiling").
    """
    seed_everything(cfg.seed + 1, cfg.train.deterministic, cfg.train.num_threads)
    classifier = new_classifier(cfg, len(target_train_labelled.classes))
    classifier.load_state_dict(source_model.train.last_state)
    method = create_method("oracle", classifier, cfg.methods.get("oracle"))
    t0 = time.perf_counter()
    result = train(
        classifier, method, target_train_labelled, target_train_labelled.without_labels(), cfg.train,
        steps=cfg.train.adapt_steps, lr=cfg.train.adapt_lr, seed=cfg.seed + 1, validator=cfg.validator,
        description="oracle", auxiliary=True,
    )
    return StageResult(classifier, result, time.perf_counter() - t0)


def pool_scores(classifier: Classifier, data: ShiftData, device, amp: bool = True) -> tuple[dict[str, float], torch.Tensor, torch.Tensor | None]:
    """Every label-free validator's score of `classifier` on the target pool, as training scores it (DEV
    when source val is there), with the pool's logits (N, K) and source val's (or None)."""
    classifier.to(device)
    target_features, target_logits = predict(classifier, data.target_adapt.images, device, amp=amp)
    scores = score_all(target_logits)
    if data.source_val is None:
        return scores, target_logits, None
    val_features, val_logits = predict(classifier, data.source_val.images, device, amp=amp)
    scores["dev"] = dev_score(val_features, val_logits, data.source_val.labels, target_features)
    return scores, target_logits, val_logits


def _scored_here(scored: Scored | None, data: ShiftData) -> tuple[dict[str, float], torch.Tensor, torch.Tensor | None] | None:
    """What `pool_scores` would compute, when training's evaluation of the same weights predicted the same pool and
    source val images under autocast (as `pool_scores` does): the same calls on the same inputs (on a CPU the same
    bits; on a GPU the kernels training's determinism chose)."""
    if scored is None or not scored.amp or (data.source_val is None) != (scored.val_logits is None):
        return None
    if scored.pool_digest != digest(data.target_adapt.images):
        return None
    if data.source_val is not None and scored.val_digest != digest(data.source_val.images):
        return None
    return dict(scored.validators), scored.pool_logits, scored.val_logits


def score_weights(classifier: Classifier, data: ShiftData, target_eval: LabelledImages | None, device,
                  scored: Scored | None = None) -> dict[str, Any]:
    """One set of weights, scored: the label-free validators on the target pool, source val accuracy
    and, when `target_eval` is given, target accuracy (per class too). Labels are read only here.
    `scored`: training's own evaluation of these weights (`TrainResult.final_scores`), read instead of
    predicting the pool and source val again when it scored the same images."""
    from udaflow.engine import per_class_accuracy
    from udaflow.engine import accuracy as top1

    from udaflow.promotion import prediction_diversity

    validators, target_logits, val_logits = _scored_here(scored, data) or pool_scores(classifier, data, device)
    out: dict[str, Any] = {"validators": validators, "source_val_acc": top1(val_logits, data.source_val.labels), "target_acc": None,
                           "pool_diversity": prediction_diversity(target_logits.argmax(1).tolist(), len(data.classes))}
    if target_eval is not None:
        same = digest(target_eval.images) == digest(data.target_adapt.images)  # transductive: the pool is the scored set
        logits = target_logits if same else predict(classifier, target_eval.images, device)[1]
        out["target_acc"] = top1(logits, target_eval.labels)
        out["target_per_class_acc"] = dict(zip(data.classes, per_class_accuracy(logits, target_eval.labels, len(data.classes))))
        out["predictions"] = logits.argmax(1)
    return out


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a is b or (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))


def evaluate_stage(cfg: Config, stage: StageResult, data: ShiftData, target_eval: LabelledImages | None = None) -> dict[str, Any]:
    """The one evaluation of a trained stage, used by the pipeline and the bench alike.

    Every figure has one name everywhere (metrics.json, MLflow, registry tags, bench rows):
    `<figure>_last` is the last iterate, `<figure>_selected` the checkpoint the label-free validator
    picked (`selected_by`, at `selected_step`), which is what the pipeline registers. Figures:
    target_acc, target_per_class_acc, source_val_acc, validators. Target labels are read here and
    only here, after training has finished. Leaves the last iterate's weights in the classifier.
    """
    from udaflow.engine import resolve_device

    device = resolve_device(cfg.train.device)
    target_eval = target_eval if target_eval is not None else data.target_eval
    classifier = stage.classifier
    out: dict[str, Any] = {}
    # the last iterate as training's last evaluation scored it (same process); the selected checkpoint is most often
    # the last iterate too (the validator's pick at the last step): scored once
    classifier.load_state_dict(stage.train.last_state)
    last = score_weights(classifier, data, target_eval, device, stage.train.final_scores)
    for name, state in (("selected", stage.train.selected_state), ("last", stage.train.last_state)):
        if name == "last" or _same_weights(state, stage.train.last_state):
            scores = copy.deepcopy(last)
        else:
            classifier.load_state_dict(state)
            scores = score_weights(classifier, data, target_eval, device)
            classifier.load_state_dict(stage.train.last_state)
        out[f"target_acc_{name}"] = scores["target_acc"]
        out[f"source_val_acc_{name}"] = scores["source_val_acc"]
        out[f"validators_{name}"] = scores["validators"]
        if "target_per_class_acc" in scores:
            out[f"target_per_class_acc_{name}"] = scores["target_per_class_acc"]
            out[f"_predictions_{name}"] = scores["predictions"]
    out["selected_by"] = stage.train.selected_by
    out["selected_step"] = stage.train.selected_step
    if "swap_retries" in stage.train.extra:  # adaptation attempts set aside for a flagged swap (adapt_to_target)
        out["swap_retries"] = stage.train.extra["swap_retries"]
        out["swap_retry_count"] = len(out["swap_retries"])
    out["seconds"] = round(stage.wall_seconds, 2)
    out["train_images_per_s"] = round(stage.train.images_per_s, 1)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["device"] = stage.train.device
    out["cached"] = stage.cached
    return out