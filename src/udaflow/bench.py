"""`udaflow bench`: every (shift, method, seed) on the built-in or user domains, one JSON row each.

Protocols: `transductive` (the literature's: adapt on every target image unlabelled, accuracy over
all of them) and `holdout` (adapt on target train, accuracy on the labelled target test split).
The oracle trains on target-train labels and is always scored on target test.

Source pretraining is shared by the methods of a shift (and cached on disk across runs).
Reported accuracies are the last iterate (`target_acc`) and the checkpoint the label-free
validator picked (`target_acc_selected`, named in `selected_by`); never a best-by-target pick.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from udaflow.config import Config
from udaflow.data.datasets import load_oracle_data, load_shift
from udaflow.experiment import adapt_to_target, evaluate_stage, pretrain_source, train_oracle
from udaflow.methods import get_method_class

ROW_KEYS = (
    "shift", "method", "seed", "protocol", "target_acc", "target_acc_selected", "selected_by", "selected_step",
    "source_val_acc", "validators", "seconds", "train_images_per_s", "peak_rss_mb", "device",
)


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
) -> list[dict[str, Any]]:
    for m in methods:
        get_method_class(m)  # unknown names fail before any training
    rows: list[dict[str, Any]] = []
    for source, target in shifts:
        data = load_shift(cfg.data.root, source, target, cfg.data.image_size, protocol)  # type: ignore[arg-type]
        if data.target_eval is None:
            raise ValueError(f"bench needs target labels to report accuracy; domain '{target}' has none")
        for seed in range(seeds):
            run_cfg = cfg.model_copy(update={"seed": cfg.seed + seed})
            pretrained = pretrain_source(run_cfg, data, source)
            for method in methods:
                if method == "source_only":
                    stage, target_eval = pretrained, None
                elif get_method_class(method).uses_target_labels:
                    labelled = load_oracle_data(cfg.data.root, target, data.classes, cfg.data.image_size)
                    stage = train_oracle(run_cfg, pretrained, labelled, data.target_adapt)
                    test = load_shift(cfg.data.root, source, target, cfg.data.image_size, "holdout")
                    target_eval = test.target_eval
                else:
                    stage, target_eval = adapt_to_target(run_cfg, method, pretrained, data.source_train, data.target_adapt), None
                metrics = evaluate_stage(run_cfg, stage, data, target_eval)
                row = {"shift": f"{source}:{target}", "method": method, "seed": run_cfg.seed, "protocol": protocol}
                row.update({k: metrics[k] for k in ROW_KEYS if k in metrics and k not in row})
                if method == "source_only":
                    row["cached_pretraining"] = stage.cached
                if get_method_class(method).uses_target_labels:
                    row["protocol"] = "oracle: target-train labels, scored on target test"
                rows.append(row)
                if on_row:
                    on_row(row)
                if out is not None:
                    write_rows(rows, out)
    return rows


def write_rows(rows: list[dict[str, Any]], out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    tmp.replace(out)
