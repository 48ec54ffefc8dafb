"""The pipeline's steps with files between them: validate -> pretrain -> adapt -> evaluate.

Prefect tasks (tasks/) and DVC stages (`udaflow stage ...` in dvc.yaml) call these same functions,
so `udaflow run` and `dvc repro` run the same code and write the same files:

  runs/<source>-to-<target>/validation/        GX result JSON + Data Docs
  runs/<source>-to-<target>/source_model.pt    the source model (the cached one, less what a target pool scored)
  runs/<source>-to-<target>/<method>/model.pt  the adapted model: last iterate + validator pick
  runs/<source>-to-<target>/<method>/metrics.json, *.png

metrics.json holds only what the data, code and parameters decide (no wall times), so a CPU run
in deterministic mode writes it byte for byte again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from udaflow import distributed
from udaflow.config import Config
from udaflow.data.datasets import Domain, ShiftData, load_shift
from udaflow.data.expectations import ValidationReport, validate_shift
from udaflow.locks import exclusive
from udaflow.engine import TrainResult, accuracy, predict, resolve_device
from udaflow.experiment import (
    StageResult, adapt_to_target, source_cache_path, source_lock, evaluate_stage, image_spec, load_stage, new_classifier, pretrain_source, save_stage, score_weights,
)
from udaflow.models import ImageClassifier
from udaflow.promotion import Measurement, prediction_diversity
from udaflow.validators import dev_score, get_validator


@dataclass(frozen=True)
class RunPaths:
    shift_dir: Path
    validation: Path
    source_model: Path
    method_dir: Path
    model: Path
    checkpoint: Path
    metrics: Path


def run_paths(cfg: Config) -> RunPaths:
    shift = Path(cfg.work_dir) / f"{cfg.source}-to-{cfg.target}"
    method = shift / cfg.method
    return RunPaths(shift, shift / "validation", shift / "source_model.pt", method, method / "model.pt", method / "checkpoint.pt", method / "metrics.json")


@dataclass(frozen=True)
class StepOutcome:
    """What a training step wrote and how it went (small and picklable: Prefect may persist it)."""

    path: str
    seconds: float
    cached: bool = False
    cache_key: str = ""
    images_per_s: float = 0.0
    selected_step: int = 0
    steps: int = 0  # optimisation steps run (cdtrans runs step_scale x train.adapt_steps)


def load_data(cfg: Config) -> ShiftData:
    return load_shift(cfg.data.root, cfg.source, cfg.target, image_spec(cfg), "holdout", cfg.image_cache)


def recover_ingests(cfg: Config, domains) -> None:
    """Roll back (or finish) what an ingest of any of `domains`, killed outright, left half-done
    (`versioning.recover_interrupted_ingest`), saying so on stderr: nothing may read or version a
    half-ingested folder, nor call a folder set aside by it missing."""
    import sys

    from udaflow import versioning

    for domain in dict.fromkeys(domains):
        recovered = versioning.recover_interrupted_ingest(Path(cfg.data.root) / domain)
        if recovered:
            sys.stderr.write(recovered + "\n")


def validate_datasets(cfg: Config) -> ValidationReport:
    """Both domains' GX suites, after `recover_ingests`: the run must neither read nor version a
    half-ingested folder."""
    recover_ingests(cfg, (cfg.source, cfg.target))
    return validate_shift(cfg.data.root, cfg.source, cfg.target, run_paths(cfg).validation, cfg.data.min_per_class)


def _write_source_copy(cache: Path, dest: Path) -> None:
    """This shift's copy of a cached source model: its weights, loss history and timings.

    The cache serves every target of its source, and its validator history, kept checkpoints and
    pick were scored on the target pool that first trained it (the bench's validator study reads
    them again on its own pool: `experiment.rescore_on_pool`). Adaptation and evaluation read only
    the last iterate, so the copy leaves the pool's part out: its bytes, the `pretrain` stage's
    output in dvc.lock, are the same whichever shift trained the cache first."""
    result, wall_seconds, classes = load_stage(cache)
    result = dataclasses.replace(
        result, selected_state=result.last_state, selected_step=result.steps, selected_by="last",
        validator_history=[], checkpoint_states=[], checkpoint_logits=[],
    )
    save_stage(dest, result, wall_seconds, classes)


def _load(cfg: Config, path: Path) -> tuple[StageResult, tuple[str, ...]]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run the previous pipeline step first")
    result, wall_seconds, classes = load_stage(path)
    classifier = new_classifier(cfg, len(classes))
    classifier.load_state_dict(result.last_state)
    return StageResult(classifier, result, wall_seconds), classes


def _under_torchrun(cfg: Config) -> bool:
    """True when this process should start `train.nproc` ranks instead of training itself."""
    return cfg.train.nproc > 1 and not distributed.active()


def pretrain(cfg: Config, data: ShiftData | None = None, cache_dir: Path | None = None) -> StepOutcome:
    """Source pretraining, reused from the on-disk cache when source content and params match
    (`experiment.pretrain_source`: two runs needing one source model train it in turn)."""
    if _under_torchrun(cfg):
        # the ranks' pretraining (a cache entry of its own: nproc is in its key) is held for them by this process
        classes = Domain.open(cfg.data.root, cfg.source).classes
        with source_lock(source_cache_path(cfg, cfg.source, len(classes), cache_dir), cfg.source):
            return StepOutcome(**distributed.launch("pretrain", cfg, run_paths(cfg).shift_dir / "pretrain.outcome.json", cache_dir=cache_dir))
    data = data or load_data(cfg)
    stage = pretrain_source(cfg, data, cfg.source, cache_dir)
    if distributed.is_main():
        _write_source_copy(Path(stage.info["cache"]), run_paths(cfg).source_model)
    # the cache file is what later steps read: it outlives this shift's copy and is keyed on content
    return StepOutcome(stage.info["cache"], stage.wall_seconds, stage.cached, stage.info["key"], stage.train.images_per_s, steps=stage.train.steps)


def adapt(cfg: Config, data: ShiftData | None = None, source_model: Path | None = None) -> StepOutcome:
    """Adapt the source model with cfg.method; resumes from the method's checkpoint if a run was killed.

    The last checkpoint (at the final step) stays until `drop_checkpoint`, which the pipeline calls once
    the promotion gate has decided: a run killed while it evaluates, registers or gates resumes at the
    final step, with no step to train again."""
    paths = run_paths(cfg)
    if _under_torchrun(cfg):
        return StepOutcome(**distributed.launch("adapt", cfg, paths.method_dir / "adapt.outcome.json", source_model=source_model))
    data = data or load_data(cfg)
    source_model = Path(source_model or paths.source_model)
    if distributed.is_main() and source_model.resolve() != paths.source_model.resolve():
        # a cached source model from another shift: this shift's copy is what dvc.yaml's stages read
        _write_source_copy(source_model, paths.source_model)
    source, classes = _load(cfg, source_model)
    t0 = time.perf_counter()
    adapted = adapt_to_target(cfg, cfg.method, source, data.source_train, data.target_adapt, paths.checkpoint, data.source_val)
    if distributed.is_main():
        save_stage(paths.model, adapted.train, adapted.wall_seconds, classes)
    return StepOutcome(
        str(paths.model), time.perf_counter() - t0, images_per_s=adapted.train.images_per_s, selected_step=adapted.train.selected_step,
        steps=adapted.train.steps,
    )


def drop_checkpoint(cfg: Config) -> None:
    """Remove the adaptation's resume point, once what it trained is kept (registered, or a stage's output)."""
    checkpoint = run_paths(cfg).checkpoint
    checkpoint.unlink(missing_ok=True)
    for retry in checkpoint.parent.glob(f"{checkpoint.stem}.retry*{checkpoint.suffix}"):  # adaptation run again after a flagged swap
        retry.unlink(missing_ok=True)


def registered_model(cfg: Config) -> tuple[Path, Any]:
    """The model a pipeline run registers (the validator-selected weights), packaged as
    safetensors + config.json in runs/<shift>/<method>/registered/, and an input example."""
    from udaflow.models import packaged

    paths = run_paths(cfg)
    stage, classes = _load(cfg, paths.model)
    stage.classifier.load_state_dict(stage.train.selected_state)
    model = ImageClassifier(stage.classifier, classes).eval()  # with the backbone's normalisation
    folder = packaged.save(model, paths.method_dir / "registered", cfg.model.backbone, cfg.model.backbone_args, image_spec(cfg).size)
    return folder, serving_example(cfg)


def serving_example(cfg: Config):
    """Two target images as a client sends them, base64 (MLflow's serving example): each re-encoded as a PNG
    of the pixels the model reads (upright, at its input size). The files as stored made every version carry
    two copies (input and serving example) of the first two photos whole: 98 MB each for two 4096 x 3000 PNGs."""
    import base64
    import io

    import pandas as pd
    from PIL import Image

    from udaflow.data.datasets import to_model_pixels
    from udaflow.models.packaged import IMAGE

    target, spec, encoded = Domain.open(cfg.data.root, cfg.target), image_spec(cfg), []
    for row in target.select("train")[:2]:
        with Image.open(target.root / row.path) as img:
            pixels = to_model_pixels(img, spec)  # (3, S, S) uint8
        buffer = io.BytesIO()
        Image.fromarray(pixels.transpose(1, 2, 0), "RGB").save(buffer, "PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return pd.DataFrame({IMAGE: encoded})


# --- the promotion gate's measurements (the decision is udaflow.promotion's, the registry udaflow.tracking's) ---


@dataclass
class GateData:
    """What the gate scores every version on, loaded once per gate: the current target pool, the
    source val split and, when the target has one, its labelled `val` split (never `test`).

    Each version is scored on the images decoded its own way (size, resize, crop: `input_spec` of its
    package): a champion trained before params.yaml's backbone or image size changed still sees the
    input it was trained on, not the challenger's."""

    source: Domain
    target: Domain
    classes: tuple[str, ...]
    description: str
    image_cache: Any
    decoded: dict = field(default_factory=dict, repr=False)  # (size, variant) -> (pool, source_val, target_val)

    def at(self, spec) -> tuple[Any, Any, Any]:
        """(pool, source_val, target_val | None) decoded with ImageSpec `spec`; pool is (N, 3, H, W) uint8,
        the target `train` split, labels never read."""
        key = (spec.size, spec.variant)
        if key not in self.decoded:
            tgt = self.target
            self.decoded[key] = (
                tgt.unlabelled("train", spec, self.image_cache).images,
                self.source.labelled("test", self.classes, spec, self.image_cache),
                tgt.labelled("val", self.classes, spec, self.image_cache) if tgt.has_labels("val") else None,
            )
        return self.decoded[key]


def load_gate_data(cfg: Config) -> GateData:
    src, tgt = Domain.open(cfg.data.root, cfg.source), Domain.open(cfg.data.root, cfg.target)
    data = GateData(src, tgt, tuple(src.classes), "", cfg.image_cache)
    pool, source_val, target_val = data.at(image_spec(cfg))  # today's input, the challenger's: decoded up front
    validator = cfg.promotion.validator or cfg.validator
    decided = (f"accuracy on target '{cfg.target}' val split ({len(target_val)} labelled images)" if target_val is not None
               else f"validator '{validator}' on target '{cfg.target}' train pool ({len(pool)} images, labels unread)")
    data.description = f"{decided}; source val accuracy on '{cfg.source}' test split ({len(source_val)} images)"
    return data


def measure_for_gate(model: ImageClassifier, data: GateData, validator: str, device) -> Measurement:
    """Score one registered model on the gate's data (the version number is filled in by the caller)."""
    from udaflow.models.packaged import input_spec

    if tuple(model.classes) != tuple(data.classes):
        from udaflow.data.manifest import DataError

        source = data.source.name
        raise DataError(f"the model's classes {model.classes} are not the source's {list(data.classes)}",
                        f"the model was trained on another version of '{source}': `git log -p -- data/raw/{source}.dvc` lists its "
                        f"versions; `git checkout <commit> -- data/raw/{source}.dvc && dvc checkout data/raw/{source}.dvc` brings "
                        "one back (`data ingest --replace` printed the command for the version it replaced)")
    pool, source_val, target_val = data.at(input_spec(model.package_config))
    classifier = model.classifier.to(device)
    pool_features, pool_logits = predict(classifier, pool, device)
    source_features, source_logits = predict(classifier, source_val.images, device)
    score_fn = get_validator(validator)
    score = score_fn(pool_logits) if score_fn else dev_score(source_features, source_logits, source_val.labels, pool_features)
    target_val_acc = None
    if target_val is not None:
        target_val_acc = accuracy(predict(classifier, target_val.images, device)[1], target_val.labels)
    return Measurement(
        version="", validator=score, source_val_acc=accuracy(source_logits, source_val.labels),
        diversity=prediction_diversity(pool_logits.argmax(1).tolist(), len(data.classes)), target_val_acc=target_val_acc,
        num_classes=len(data.classes),
    )


def gate(cfg: Config, name: str, dry_run: bool = False, version: str | None = None):
    """The promotion gate on the registry: both versions measured now on the same data; `version`, when a
    run gates the version it registered (tracking.promote). Returns (decision, challenger version, previous
    champion version or None)."""
    from udaflow import tracking

    data = load_gate_data(cfg)
    validator = cfg.promotion.validator or cfg.validator
    device = resolve_device(cfg.train.device)

    def measure(uri: str) -> Measurement:
        return measure_for_gate(tracking.load_model(uri), data, validator, device)

    return tracking.promote(name, measure, validator, cfg.promotion.source_tolerance, cfg.promotion.min_diversity, data.description, dry_run,
                             version)


def evaluate(cfg: Config, data: ShiftData | None = None, source_model: Path | None = None) -> dict[str, Any]:
    """Evaluate source and adapted models; write metrics.json and the figures; return the metrics.

    The figures come from experiment.evaluate_stage, the bench's evaluation too: `<figure>_selected`
    is the checkpoint the label-free validator picked (the registered weights), `<figure>_last` the
    last iterate, `source_only_<figure>` the source model. Shift is measured on source-val vs the
    target pool features, before (source model) and after (registered weights) adaptation.
    """
    from udaflow import plots
    from udaflow.shift import class_swaps, mmd, proxy_a_distance

    if cfg.train.num_threads:  # as training ran: `udaflow stage evaluate` (dvc repro) is a fresh process at torch's default,
        torch.set_num_threads(cfg.train.num_threads)  # and its MMD's sums in another order wrote other metrics.json bytes
    data = data or load_data(cfg)
    paths = run_paths(cfg)
    device = resolve_device(cfg.train.device)
    source, _ = _load(cfg, Path(source_model or paths.source_model))
    adapted, classes = _load(cfg, paths.model)
    before = score_weights(source.classifier, data, data.target_eval, device)
    scores = evaluate_stage(cfg, adapted, data)
    predictions = scores.pop("_predictions_selected", None)
    scores.pop("_predictions_last", None)
    metrics: dict[str, Any] = {"source": cfg.source, "target": cfg.target, "method": cfg.method, "seed": cfg.seed, "registered": "selected"}
    metrics.update({k: v for k, v in scores.items() if k not in ("seconds", "train_images_per_s", "peak_rss_mb", "device", "cached")})
    metrics.update(
        source_only_target_acc=before["target_acc"],
        source_only_source_val_acc=before["source_val_acc"],
        validators_source_only=before["validators"],
        # how the source model's predictions spread over the classes on the pool: the gate's collapse bar scales with it
        source_only_prediction_diversity=round(before["pool_diversity"], 6),
        target_images=len(data.target_eval) if data.target_eval is not None else 0,
    )

    adapted.classifier.load_state_dict(adapted.train.selected_state)
    target = Domain.open(cfg.data.root, cfg.target)
    if target.has_labels("val"):  # the user's labelled `val` split, the gate's: the first version is checked there (promotion.py)
        val = target.labelled("val", data.classes, image_spec(cfg), cfg.image_cache)
        metrics.update(
            target_val_acc_selected=accuracy(predict(adapted.classifier, val.images, device)[1], val.labels),
            source_only_target_val_acc=accuracy(predict(source.classifier, val.images, device)[1], val.labels),
            target_val_images=len(val),
        )
    feats_before = (predict(source.classifier, data.source_val.images, device)[0], predict(source.classifier, data.target_adapt.images, device)[0])
    pool_after = predict(adapted.classifier, data.target_adapt.images, device)
    feats_after = (predict(adapted.classifier, data.source_val.images, device)[0], pool_after[0])
    # the registered weights' labels on the pool, read in the source model's features: the gate refuses flagged swaps
    swaps = class_swaps(feats_before[0], data.source_val.labels, feats_before[1], pool_after[1].argmax(1), len(data.classes))
    metrics["class_swaps"] = [[data.classes[a], data.classes[b]] for a, b in swaps]
    metrics["class_swaps_flagged"] = len(swaps)
    metrics["shift"] = {
        "pad_before": proxy_a_distance(*feats_before, seed=cfg.seed),
        "pad_after": proxy_a_distance(*feats_after, seed=cfg.seed),
        "mmd_before": mmd(*feats_before, seed=cfg.seed),
        "mmd_after": mmd(*feats_after, seed=cfg.seed),
    }

    paths.method_dir.mkdir(parents=True, exist_ok=True)
    if predictions is not None:
        matrix = plots.confusion_matrix(data.target_eval.labels, predictions, classes)
        plots.plot_confusion(matrix, classes, f"{cfg.method}: {cfg.source} -> {cfg.target} (target test)", paths.method_dir / "confusion_matrix.png")
    plots.plot_feature_maps(
        {"before": plots.embed_2d(*feats_before, seed=cfg.seed), "after": plots.embed_2d(*feats_after, seed=cfg.seed)},
        paths.method_dir / "feature_map.png",
    )
    plots.plot_losses(source.train.loss_history, f"source pretraining: {cfg.source}", paths.method_dir / "loss_pretrain.png")
    plots.plot_losses(adapted.train.loss_history, f"adaptation: {cfg.method}", paths.method_dir / "loss_adapt.png")
    tmp = paths.metrics.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    tmp.replace(paths.metrics)
    metrics["history"] = {"pretrain": source.train.loss_history, "adapt": adapted.train.loss_history, "validators": adapted.train.validator_history}
    return metrics


REPRODUCED_METRICS = ("target_acc_selected", "target_acc_last", "source_val_acc_selected", "source_val_acc_last", "source_only_target_acc")
# names runs logged before every figure carried its _selected / _last suffix
LEGACY_NAMES = {"target_acc_selected": "target_acc", "source_val_acc_selected": "source_val_acc"}


def compare_metrics(original: dict[str, float], reproduced: dict[str, Any], tolerance: float = 0.0) -> tuple[bool, list[tuple[str, Any, Any, bool]]]:
    """Side-by-side rows of the headline metrics, each with its verdict; equal when every pair differs by <= tolerance
    (a validator's score by <= 1e-6 at least)."""
    rows, same = [], True
    for key in REPRODUCED_METRICS:
        a, b = original.get(key, original.get(LEGACY_NAMES.get(key, ""))), reproduced.get(key)
        if a is None and b is None:
            continue
        ok = a is not None and b is not None and abs(float(a) - float(b)) <= tolerance
        same &= ok
        rows.append((key, a, b, ok))
    for key, value in sorted(reproduced.get("validators_selected", {}).items()):
        a = original.get(f"validator_selected.{key}", original.get(f"validator.{key}"))
        ok = a is not None and abs(float(a) - float(value)) <= max(tolerance, 1e-6)
        same &= ok
        rows.append((f"validator_selected.{key}", a, value, ok))
    return same, rows


def rerun_config(recorded: dict[str, Any], device: str | None = None, workspace: Path | None = None) -> Config:
    """A recorded run's resolved params as a Config to re-run it with: on `device` instead of its own
    train.device when given, reading data from and writing runs to `workspace` when given."""
    config = {**recorded, "train": {**recorded.get("train", {}), **({"device": device} if device else {})}}
    if workspace is not None:
        config.update(data={**recorded.get("data", {}), "root": str(Path(workspace) / "data/raw")}, work_dir=str(Path(workspace) / "runs"))
    return Config.model_validate(config)


# what decides a run's floating-point bits besides its code, params, data and seed (run tags; `costs.machine`)
BIT_DEPENDENCIES = {"hardware.cpu": "CPU", "hardware.cpu_capability": "CPU kernels", "hardware.gpu": "GPU", "version.torch": "torch"}


def machine_differences(recorded: dict[str, str], now: dict[str, str]) -> list[str]:
    """One "what: recorded -> now" line for each of BIT_DEPENDENCIES the two runs disagree on; a run
    recorded before udaflow tagged its hardware has nothing to compare, so nothing is said."""
    return [f"{name}: {recorded[key]} -> {now.get(key, 'unknown')}" for key, name in BIT_DEPENDENCIES.items()
            if key in recorded and recorded[key] != now.get(key, "unknown")]


@contextmanager
def exclusive_shift(cfg: Config):
    """Hold runs/<source>-to-<target>/.lock for a whole pipeline run: two runs on one shift share its
    files (source model copy, checkpoints) and its registered model, so the second waits its turn."""
    shift_dir = run_paths(cfg).shift_dir
    with exclusive(shift_dir / ".lock", f"another udaflow run on {shift_dir.name}"):
        yield


@contextmanager
def domains_in_use(cfg: Config, names: Iterable[str] | None = None):
    """The run's source and target folders (or the domains `names`: a bench's, every shift's) held against a
    replacing ingest until it ends (`versioning.domains_in_use`)."""
    from udaflow import versioning

    names = [cfg.source, cfg.target] if names is None else list(names)
    with versioning.domains_in_use([Path(cfg.data.root) / name for name in names]):
        yield


def _sample_pixels(domain: Domain, spec, max_images: int, seed: int):
    """Up to `max_images` images of the whole domain (every split; labels never read), seeded."""
    import numpy as np

    rows = domain.select("all")
    if len(rows) > max_images:
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), max_images, replace=False))
        rows = [rows[i] for i in pick]
    return domain.pixels(rows, spec)


def drift(cfg: Config):
    """New target data (data.root/<target> now) against the data the champion of <source>-to-<target>
    was adapted on (restored by its DVC hash), on the champion's features: a drift.DriftReport, or
    None when the model has no champion. The caller logs it and decides what to announce."""
    import tempfile

    from udaflow import drift as drift_lib
    from udaflow import tracking, versioning
    from udaflow.models.packaged import input_spec

    name = tracking.model_name(cfg.source, cfg.target)
    hashes = tracking.alias_data_hashes(name, tracking.CHAMPION)
    if hashes is None:
        return None
    seed, d = cfg.seed, cfg.drift
    model = tracking.load_model(f"models:/{name}@{tracking.CHAMPION}")
    spec = input_spec(model.package_config)  # the champion's own input, whatever params.yaml says today
    device = resolve_device(cfg.train.device)
    classifier = model.classifier.to(device)
    with tempfile.TemporaryDirectory(prefix="udaflow-drift-") as tmp:
        reference_root = Path(tmp)
        project = versioning.find_root(Path(cfg.data.root).resolve())
        versioning.restore_dataset(hashes["target"], reference_root / cfg.target, project)
        reference = _sample_pixels(Domain.open(reference_root, cfg.target), spec, d.max_images, seed)
    new = _sample_pixels(Domain.open(cfg.data.root, cfg.target), spec, d.max_images, seed + 1)
    validator = cfg.promotion.validator or cfg.validator
    score = get_validator(validator)
    if score is None:  # a source-aware validator (dev) needs the source: compare with IM instead
        validator, score = "im", get_validator("im")
    return drift_lib.measure(
        predict(classifier, reference, device), predict(classifier, new, device), score, validator,
        alpha=d.alpha, min_pad=d.min_pad, validator_drop=d.validator_drop, permutations=d.permutations, seed=seed,
        reference_name=f"'{cfg.target}' at {hashes['target']} (the data {name}@champion was adapted on)",
    )
