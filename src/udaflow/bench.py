"""`udaflow bench`: every (shift, method, seed) on the built-in or user domains, one JSON row each.

Protocols: `transductive` (the literature's: adapt on every target image unlabelled, accuracy over
all of them) and `holdout` (adapt on target train, accuracy on the labelled target test split).
The oracle trains on target-train labels and is always scored on target test.

Source pretraining is shared by the methods of a shift (and cached on disk across runs).
Reported accuracies are the last iterate (`target_acc_last`) and the checkpoint the label-free
validator picked (`target_acc_selected`, named in `selected_by`); never a best-by-target pick.
Rows carry the names the pipeline's metrics.json, MLflow and the registry use (one evaluation
function, experiment.evaluate_stage).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from udaflow.config import Config
from udaflow.costs import matmul_gflops, training_gflop_per_image
from udaflow.data.datasets import load_oracle_data, load_shift
from udaflow.experiment import adapt_to_target, evaluate_stage, image_spec, pretrain_source, train_oracle
from udaflow.methods import get_method_class
from udaflow.validators import ensemble_agreement

ROW_KEYS = (
    "shift", "method", "seed", "protocol", "target_acc_last", "target_acc_selected", "selected_by", "selected_step",
    "source_val_acc_last", "source_val_acc_selected", "validators_last", "validators_selected", "seconds", "train_images_per_s",
    "peak_rss_mb", "device",
)  # plus training_cost's keys; for every non-oracle method: best_checkpoint_target_acc, selection_loss,
# regret (per validator) and median_last5_target_acc (reported, never used to select)


def parse_shifts(text: str) -> list[tuple[str, str]]:
    shifts = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"--shifts: '{item}' is not SOURCE:TARGET (e.g. synth:mnist)")
        shifts.append((parts[0], parts[1]))
    return shifts


def run_bench(
    cfg: Config,
    shifts: list[tuple[str, str]],
    methods: list[str],
    seeds: int = 1,
    protocol: str = "transductive",
    out: Path | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_correlations: Callable[[dict[str, Any]], None] | None = None,
    on_machine: Callable[[float, int], None] | None = None,
) -> list[dict[str, Any]]:
    for m in methods:
        get_method_class(m)  # unknown names fail before any training
    if cfg.train.nproc > 1:
        from udaflow.config import ConfigError

        raise ConfigError(f"train.nproc: the bench trains in one process (got {cfg.train.nproc}); `udaflow run --nproc N` runs data parallel")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    machine_gflops = round(matmul_gflops(), 1)  # this machine's fp32 GEMM rate: speeds below are ratios of it
    if on_machine:
        on_machine(machine_gflops, torch.get_num_threads())
    rows: list[dict[str, Any]] = []
    correlations: dict[str, Any] = {}
    for source, target in shifts:
        study: list[dict[str, Any]] = []
        data = load_shift(cfg.data.root, source, target, image_spec(cfg), protocol, cfg.image_cache)  # type: ignore[arg-type]
        if data.target_eval is None:
            raise ValueError(f"bench needs target labels to report accuracy; domain '{target}' has none")
        for seed in range(seeds):
            run_cfg = cfg.model_copy(update={"seed": cfg.seed + seed})
            pretrained = pretrain_source(run_cfg, data, source)
            for method in methods:
                if method == "source_only":
                    stage, target_eval = pretrained, None
                elif get_method_class(method).uses_target_labels:
                    labelled = load_oracle_data(cfg.data.root, target, data.classes, image_spec(cfg), cfg.image_cache)
                    stage = train_oracle(run_cfg, pretrained, labelled, data.target_adapt)
                    test = load_shift(cfg.data.root, source, target, image_spec(cfg), "holdout", cfg.image_cache)
                    target_eval = test.target_eval
                else:
                    stage, target_eval = adapt_to_target(
                        run_cfg, method, pretrained, data.source_train, data.target_adapt, source_val=data.source_val, keep_checkpoints=True,
                    ), None
                metrics = evaluate_stage(run_cfg, stage, data, target_eval)
                row = {"shift": f"{source}:{target}", "method": method, "seed": run_cfg.seed, "protocol": protocol}
                row.update({k: metrics[k] for k in ROW_KEYS if k in metrics and k not in row})
                if method == "source_only":
                    row["cached_pretraining"] = stage.cached
                row.update(training_cost(run_cfg, stage, row["train_images_per_s"], machine_gflops))
                if not get_method_class(method).uses_target_labels:
                    # the validator study: every kept checkpoint scored with target labels, AFTER training,
                    # to report how well each label-free score tracks accuracy. Never used to select.
                    checkpoints = checkpoint_study(run_cfg, stage, data)
                    study.extend({"method": method, "seed": run_cfg.seed, **c["scores"], "target_acc": c["target_acc"]} for c in checkpoints)
                    if checkpoints:
                        best = max(c["target_acc"] for c in checkpoints)
                        row["best_checkpoint_target_acc"] = best  # reported, never used
                        row["selection_loss"] = round(best - metrics["target_acc_selected"], 2)
                        row.update(selection_report(checkpoints))
                if get_method_class(method).uses_target_labels:
                    row["protocol"] = "oracle: target-train labels, scored on target test"
                rows.append(row)
                if on_row:
                    on_row(row)
                if out is not None:
                    write_rows(rows, out)
        correlations[f"{source}:{target}"] = {**validator_correlations(study), "regret": mean_regret(rows, f"{source}:{target}")}
        if out is not None:
            write_rows(correlations, Path(out).with_suffix(".validators.json"))
    if on_correlations:
        on_correlations(correlations)
    return rows


def training_cost(cfg: Config, stage, images_per_s: float, machine_gflops: float) -> dict[str, float]:
    """Training FLOPs per image (forward + backward), the GFLOP/s that achieved, and its share of the GEMM rate."""
    per_image = training_gflop_per_image(stage.classifier, image_spec(cfg).size)
    achieved = per_image * images_per_s
    return {
        "train_gflop_per_image": round(per_image, 6), "achieved_gflops": round(achieved, 1),
        "matmul_gflops": machine_gflops, "matmul_fraction": round(achieved / machine_gflops, 3) if machine_gflops else None,
    }


def checkpoint_study(cfg: Config, stage, data) -> list[dict[str, Any]]:
    """Every checkpoint the engine kept and scored: step, target accuracy (labels read here, after
    training), its validator scores plus EnsV over the run's checkpoints, and whether the method
    lets a validator select it (cdtrans's warm-up checkpoints are scored, never selected)."""
    from udaflow.engine import accuracy, predict, resolve_device

    device = resolve_device(cfg.train.device)
    scores = {row["step"]: row for row in stage.train.validator_history}
    selectable_from = stage.train.extra.get("selectable_from", 0)
    out, pool_logits = [], []
    for step, state in stage.train.checkpoint_states:
        if step not in scores:
            continue
        stage.classifier.load_state_dict(state)
        stage.classifier.to(device)
        pool_logits.append(predict(stage.classifier, data.target_adapt.images, device)[1])  # label-free
        acc = accuracy(predict(stage.classifier, data.target_eval.images, device)[1], data.target_eval.labels)
        row_scores = {k: v for k, v in scores[step].items() if k != "step"}
        out.append({"step": step, "target_acc": acc, "scores": row_scores, "selectable": step >= selectable_from})
    for checkpoint, ensv in zip(out, ensemble_agreement(pool_logits)):
        checkpoint["scores"]["ensv"] = ensv
    stage.classifier.load_state_dict(stage.train.last_state)
    return out


def selection_report(checkpoints: list[dict[str, Any]]) -> dict[str, Any]:
    """Per validator, its regret: best-by-target accuracy minus the accuracy of the checkpoint it would
    pick (reported, never used); and the median accuracy of the last five evaluations (the
    protocol of AdaMatch's and other published tables)."""
    selectable = [c for c in checkpoints if c["selectable"]] or checkpoints
    best = max(c["target_acc"] for c in selectable)
    regret = {}
    for name in sorted(selectable[0]["scores"]):
        picked = max(selectable, key=lambda c: c["scores"][name])
        regret[name] = round(best - picked["target_acc"], 2)
    last_five = sorted(checkpoints, key=lambda c: c["step"])[-5:]
    return {"regret": regret, "median_last5_target_acc": round(float(np.median([c["target_acc"] for c in last_five])), 2)}


def mean_regret(rows: list[dict[str, Any]], shift: str) -> dict[str, float]:
    """Each validator's regret averaged over the shift's rows (methods and seeds)."""
    regrets = [r["regret"] for r in rows if r["shift"] == shift and "regret" in r]
    names = sorted({n for r in regrets for n in r})
    return {n: round(float(np.mean([r[n] for r in regrets if n in r])), 2) for n in names}


def validator_correlations(study: list[dict[str, Any]]) -> dict[str, Any]:
    """Spearman rank correlation of each validator with target accuracy over all checkpoints and methods."""
    from scipy.stats import spearmanr

    if len(study) < 3:
        return {"checkpoints": len(study)}
    names = sorted({k for row in study for k in row} - {"method", "seed", "target_acc"})
    accs = [row["target_acc"] for row in study]
    out: dict[str, Any] = {"checkpoints": len(study), "spearman": {}}
    for name in names:
        values = [row.get(name) for row in study]
        if any(v is None for v in values):
            continue
        rho = spearmanr(values, accs).statistic
        out["spearman"][name] = None if rho != rho else round(float(rho), 3)
    return out


SUMMARY_KEYS = ("target_acc_last", "target_acc_selected", "median_last5_target_acc", "seconds", "train_images_per_s", "achieved_gflops")


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds of each (shift, method) cell, in first-seen order."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["shift"], row["method"]), []).append(row)
    out = []
    for (shift, method), group in cells.items():
        cell: dict[str, Any] = {"shift": shift, "method": method, "seeds": len(group)}
        for key in SUMMARY_KEYS:
            values = [r[key] for r in group if r.get(key) is not None]
            if values:
                cell[key] = {"mean": round(float(np.mean(values)), 2), "std": round(float(np.std(values, ddof=1)), 2) if len(values) > 1 else 0.0}
        out.append(cell)
    return out


def write_rows(rows: list[dict[str, Any]] | dict[str, Any], out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    tmp.replace(out)
