"""Everything a run can know is wrong before it validates, versions or trains anything.

`validate_run(cfg)` is the one check every training command makes first. `cfg` has been through
the `Config` model already (types, ranges and unknown keys of params.yaml, domain-name syntax);
this adds what needs a registry or the disk, and raises ConfigError naming the key and where its
value came from (`config.blame`: the params file, `--set` or the option), or DataError naming the
domain folder, for: an unknown method, a `methods.<name>` option of the
wrong name, type or range (every entry, not only the chosen method's: each method's pydantic
`Config` model), an unknown validator (`validator`, `promotion.validator`), an unknown backbone or
backbone argument, a source or target domain that is not under `data.root`, a target that is the
source, and a source without two labelled classes. `check_device` adds, for a command that trains
on this machine, a CUDA device it does not have. Building the
backbone once on CPU is the check for its arguments.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import timm
import torch
from pydantic import ValidationError

from udaflow.config import Config, ConfigError, blame, error_key, explain
from udaflow.data.manifest import MANIFEST_NAME, DataError, missing_domain_hint, read_manifest
from udaflow.methods import get_method_class, list_methods
from udaflow.methods.base import config_from_dict
from udaflow.models import BackboneError, create_backbone
from udaflow.validators import get_validator


def validate_run(
    cfg: Config,
    *,
    methods: Sequence[str] | None = None,
    domains: Iterable[tuple[str, str]] | None = None,
) -> None:
    """Raise ConfigError / DataError for the first thing about this run that cannot work.

    `methods`: the methods the command trains (default: `cfg.method`, named by key `method`, which a
    registering command, the default, may not be the oracle: it trains on target labels);
    `domains`: (key, domain name) pairs that must exist under `data.root` (default: `source` and
    `target`; `()` skips the check, e.g. before a workspace's data is restored).
    """
    def refuse(key: str, message: str, kind: type[ValueError] = ConfigError, hint: str | None = None) -> ValueError:
        # `message` names `key`; read by load_config, the error also names where the value came from
        return kind(blame(cfg, key, message), hint)

    try:  # again, for a config made in code (model_copy(update=...) skips validation)
        Config.model_validate(cfg.model_dump())
    except ValidationError as exc:
        raise refuse(error_key(exc), explain(exc, model=Config)) from None
    t = cfg.train
    for key, batch in (("train.batch_size", t.batch_size), ("train.rotation_batch", t.rotation_batch)):
        if batch is not None and batch % t.nproc:
            raise refuse("train.nproc", f"train.nproc: {t.nproc} processes cannot split {key} = {batch} evenly (the global batch); "
                                        f"make it a multiple of {t.nproc}")
    gpus = torch.cuda.device_count() if t.device.startswith("cuda") or (t.device == "auto" and torch.cuda.is_available()) else 0
    if t.nproc > gpus > 0:  # rank r trains on cuda:r; nccl refuses two ranks on one GPU, and a rank past the last has none
        raise refuse("train.nproc", f"train.nproc: {t.nproc} processes on GPUs need a GPU each (nccl); {gpus} visible: "
                                    f"--nproc {gpus} or fewer, or --device cpu (gloo)")
    known = list_methods()
    wanted = [("method", cfg.method)] if methods is None else [("--methods", name) for name in methods]
    for key, name in wanted:
        if name not in known:
            message = f"{key}: unknown method '{name}' (known: {', '.join(known)})"
            raise refuse(key, message) if key == "method" else ConfigError(message)
    if methods is None and get_method_class(cfg.method).uses_target_labels:  # run, schedule, dvc repro: they register what they train
        raise refuse("method", f"method: '{cfg.method}' trains on target labels: benchmark only (`udaflow bench`), never registered")
    for name, options in cfg.methods.items():
        if name not in known:
            raise refuse(f"methods.{name}", f"methods.{name}: unknown method (known: {', '.join(known)})")
        try:
            config_from_dict(get_method_class(name).Config, options if options is not None else {}, f"methods.{name}")
        except ConfigError as exc:
            raise refuse(exc.key or f"methods.{name}", str(exc)) from None
    for key, name in (("validator", cfg.validator), ("promotion.validator", cfg.promotion.validator)):
        if name is None:
            continue
        try:
            get_validator(name)
        except ValueError as exc:
            raise refuse(key, f"{key}: {exc}") from None
    if not timm.is_model(cfg.model.backbone):
        raise refuse("model.backbone", f"model.backbone: unknown backbone '{cfg.model.backbone}'; any name from timm.list_models() works")
    try:
        backbone = create_backbone(cfg.model.backbone, cfg.model.pretrained, **cfg.model.backbone_args)
    except BackboneError as exc:  # its message names model.backbone_args.<key> where it can, or the weights file
        named = str(exc).split(":", 1)[0]
        if cfg.model.pretrained and named == str(Path(cfg.model.pretrained)):
            raise refuse("model.pretrained", f"model.pretrained: {exc}", hint=(
                "save the state_dict of timm.create_model(model.backbone, num_classes=0, **model.backbone_args): the same "
                "architecture and input size (img_size) as the run builds")) from None
        raise refuse(named if named.startswith("model.") else "model", f"model: {exc}") from None
    except TypeError as exc:  # an argument the timm model does not take
        raise refuse("model.backbone_args", f"model.backbone_args: {exc}") from None
    if t.nproc > 1:  # a BatchNorm layer the ranks cannot sync: refused here, not inside torchrun after pretraining began
        from udaflow.distributed import check_syncable

        check_syncable(backbone)
    work = Path(cfg.work_dir)  # checkpoints, caches, outputs: a run failed on it after Prefect had started, in a traceback
    if work.exists() and not work.is_dir():
        raise refuse("work_dir", f"work_dir: {work} is a file, not a folder")
    try:
        work.mkdir(parents=True, exist_ok=True)
        if not os.access(work, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable")
    except OSError as exc:
        raise refuse("work_dir", f"work_dir: {work} cannot be a writable folder ({exc.strerror or exc})") from None
    for key, name in (("source", cfg.source), ("target", cfg.target)) if domains is None else domains:
        folder = cfg.data.root / name
        if not folder.is_dir():
            message = f"{key}: domain '{name}' not found ({folder} is missing); {missing_domain_hint(folder, name)}"
            raise refuse(key, message, DataError) if key in ("source", "target") else DataError(message)
        _check_built_size(cfg, name, folder)
    if domains is None:
        _check_shift(cfg, refuse)


def _check_shift(cfg: Config, refuse) -> None:
    """The pairing itself: two different domains, the source labelled with two classes or more. The GX
    suites would refuse both later, in their own terms (a duplicate path, a table too short)."""
    if cfg.source == cfg.target:
        raise refuse("target", f"target: '{cfg.target}' is the source domain too; adaptation needs two different domains", DataError)
    folder = cfg.data.root / cfg.source
    if not (folder / MANIFEST_NAME).is_file():
        return  # the suites name a folder without its manifest
    classes = sorted({row.label for row in read_manifest(folder) if row.label})
    if len(classes) < 2:
        has = f"one class ('{classes[0]}')" if classes else "no labelled images (a flat folder)"
        raise refuse("source", f"source: domain '{cfg.source}' ({folder}) has {has}; a source domain is labelled, "
                               "a folder per class, with two classes or more", DataError)


def _check_built_size(cfg: Config, name: str, folder: Path) -> None:
    """The built-in `synth` holds the data.synth_size images it was rendered with. A profile or --set
    naming another size (`--set data.synth_size=20000`) cannot re-render it: the run would train on the old
    images while MLflow logged the new size."""
    manifest = folder / MANIFEST_NAME
    if name != "synth" or not manifest.is_file():
        return
    with manifest.open() as fh:
        built = sum(1 for _ in fh) - 1
    if built == cfg.data.synth_size:
        return
    from udaflow import versioning

    owner = versioning.tracked_by(folder)
    if owner is None or owner.endswith(".dvc"):  # a user's own folder of that name: its size is its own
        return
    raise ConfigError(
        blame(cfg, "data.synth_size", f"data.synth_size: {cfg.data.synth_size} for this run, but {folder} holds the {built} images it was built with "
        f"(dvc.yaml stage '{owner}'); a profile or --set cannot re-render it"),
        hint=f"set data.synth_size: {cfg.data.synth_size} in params.yaml, then `udaflow data build --domains synth` "
             f"(or `dvc repro {owner}`); or run with --set data.synth_size={built}",
    )


def check_device(cfg: Config) -> None:
    """A CUDA device this machine does not have, refused before a run's flow logs, versions or trains
    anything (it was found at pretraining, after a FAILED MLflow run and the data's versioning). Not for
    `schedule`: its retrains train on a worker, which may have the GPU."""
    device = cfg.train.device
    if device.startswith("cuda"):
        visible, index = torch.cuda.device_count(), int(device.partition(":")[2] or 0)
        if index >= visible:
            raise ConfigError(blame(cfg, "train.device", f"train.device: '{device}' but {f'{visible} CUDA GPU(s) are' if visible else 'no CUDA GPU is'} "
                                                         "visible; use cpu, or auto (a GPU when there is one)"))


def check_run_config(cfg: Config, *, domains: bool = True) -> None:
    """The earlier name of `validate_run` (domains=False: skip the domain folders)."""
    validate_run(cfg, domains=None if domains else ())
