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

import hashlib
import json
import math
import os
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from udaflow import locks
from udaflow.config import Config
from udaflow.costs import cpu_name, gemm_name, matmul_gflops, training_gflop_per_image, training_matmul
from udaflow.data.datasets import load_oracle_data, load_shift
from udaflow.data.store import digest
from udaflow.distributed import die_with_parent
from udaflow.errors import judged_here
from udaflow.experiment import adapt_to_target, evaluate_stage, image_spec, pretrain_source, rescore_on_pool, train_oracle
from udaflow.methods import get_method_class
from udaflow.validators import ensemble_agreement

ROW_KEYS = (
    "shift", "method", "seed", "protocol", "target_acc_last", "target_acc_selected", "selected_by", "selected_step",
    "source_val_acc_last", "source_val_acc_selected", "validators_last", "validators_selected", "seconds", "train_images_per_s",
    "peak_rss_mb", "device", "swap_retries",
)  # plus training_cost's keys; for every non-oracle method: best_checkpoint_target_acc, selection_loss,
# regret (per validator) and median_last5_target_acc (reported, never used to select)
CONTRACT_KEYS = ("target_acc", "source_val_acc", "validators")


def parse_shifts(text: str) -> list[tuple[str, str]]:
    shifts = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"--shifts: '{item}' is not SOURCE:TARGET (e.g. synth:mnist)")
        if parts[0] == parts[1]:
            raise ValueError(f"--shifts {item.strip()}: source and target are both '{parts[0]}'; pick two different domains")
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
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Every (shift, seed, method) cell, one row each, in that order. `jobs` > 1 runs the cells in that
    many worker processes (each with `train.num_threads`, or this machine's cores / jobs): the source
    models first, then every cell, the longest first. A cell's row is the same
    as a one-process bench with the same thread count would write (bit for bit, with deterministic)."""
    for m in methods:
        get_method_class(m)  # unknown names fail before any training
    if cfg.train.nproc > 1:
        from udaflow.config import ConfigError

        raise ConfigError(f"train.nproc: the bench trains in one process (got {cfg.train.nproc}); `udaflow run --nproc N` runs data parallel")
    if jobs < 1:
        raise ValueError(f"--jobs {jobs}: at least 1")
    if jobs > 1 and not cfg.train.num_threads:  # the cores shared out, so the workers do not oversubscribe them
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_threads": max(1, (os.cpu_count() or 1) // jobs)})})
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if jobs == 1:
        loaded = {shift: _labelled_shift(cfg, shift, protocol) for shift in shifts}  # a domain without labels fails here, before any training
        with _claim_out(out):
            return _run_cells(cfg, shifts, methods, seeds, protocol, out, on_row, on_correlations, on_machine, None, loaded)
    with _workers(cfg, jobs) as pool:
        # the same checks, every shift at once in the workers (in this process, one shift after the other, they held
        # a two-shift bench's start for 25-30 s with the other core idle); a failure stops the bench here, before any training
        for check in [pool.submit(_in_worker, _check_shift, cfg, shift, protocol) for shift in shifts]:
            check.result()
        with _claim_out(out):
            return _run_cells(cfg, shifts, methods, seeds, protocol, out, on_row, on_correlations, on_machine, pool, {})


@contextmanager
def _claim_out(out: Path | None):
    """--out is this bench's from here to its end: refused when it is another file than a bench's rows (a typo'd
    `--out params.yaml` replaced the project's parameters), or while another bench writes it (each rewrote the whole
    file after every cell, so the later one's rows replaced the other's, and both said they wrote theirs)."""
    if out is None:
        yield
        return
    out = Path(out)
    if out.is_dir():
        raise _out_error(f"--out {out}: a folder; name a JSON file (e.g. {out / 'bench.json'})")
    for path, kind in ((out, list), (out.with_suffix(".validators.json"), dict)):
        if path.exists() and not _written_by_a_bench(path, kind):
            raise _out_error(f"--out {out}: {path} exists and is not a bench's output; a bench replaces only its own JSON: name a new file")
    if out.parent.exists() and not out.parent.is_dir():
        raise _out_error(f"--out {out}: {out.parent} is a file, not a folder; name a JSON file in a folder")
    # keyed on the file itself, not on this project's work_dir or the folder it was started from: two benches naming
    # one file by other paths, from other folders or with other params, see each other
    lock = Path(tempfile.gettempdir()) / f"udaflow-bench-out-{os.getuid()}" / f"{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]}.lock"
    with ExitStack() as hold:
        try:
            hold.enter_context(locks.exclusive(lock, wait=False))
        except locks.Held as held:
            raise _out_error(f"--out {out}: another bench is writing it ({held.holder}); give this one another --out") from None
        try:  # an earlier bench's rows there would read as this one's if it stopped
            write_rows([], out)
        except OSError as exc:
            raise _out_error(f"--out {out}: cannot be written ({exc.strerror or exc}); name a JSON file in a writable folder") from None
        out.with_suffix(".validators.json").unlink(missing_ok=True)
        yield


def _out_error(message: str) -> ValueError:
    err = ValueError(message)
    err.hint = ("a bench writes its rows to --out (bench.json unless named) and its validator study beside it (.validators.json), "  # type: ignore[attr-defined]
                "replacing what an earlier bench wrote there; e.g. `--out runs/bench-own.json`")
    return err


def _written_by_a_bench(path: Path, kind: type) -> bool:
    """`path` holds what a bench writes: its rows (a JSON list of objects with a shift and a method), or its validator study (a JSON object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if kind is dict:  # per shift ("synth:mnist"), its study
        return isinstance(data, dict) and all(":" in k and isinstance(v, dict) for k, v in data.items())
    return isinstance(data, list) and all(isinstance(r, dict) and {"shift", "method"} <= set(r) for r in data)


def _run_cells(cfg, shifts, methods, seeds, protocol, out, on_row, on_correlations, on_machine, pool, loaded) -> list[dict[str, Any]]:
    # the training device's GEMM rate (fp32 on CPU at a cell's thread count, bf16 on a GPU under autocast):
    # speeds below are ratios of it
    from udaflow.engine import resolve_device

    gemm_device, gemm_dtype = training_matmul(resolve_device(cfg.train.device), cfg.train.amp)
    machine_gflops = round(matmul_gflops(device=gemm_device, dtype=gemm_dtype), 1)
    if on_machine:
        on_machine(machine_gflops, torch.get_num_threads())
    cells = [(shift, seed, method) for shift in shifts for seed in range(seeds) for method in methods]
    results: dict[tuple, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    rows: list[dict[str, Any]] = []

    def done(cell: tuple, result: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
        result = (settle_row(result[0]), result[1])
        results[cell] = result
        rows[:] = [results[c][0] for c in cells if c in results]  # the cells' order, whichever finished first
        if on_row:
            on_row(result[0])
        if out is not None:
            write_rows(rows, out)

    if pool is None:
        for shift in shifts:
            data = loaded.pop(shift)
            for seed in range(seeds):
                pretrained = pretrain_source(_seeded(cfg, seed), data, shift[0])
                for method in methods:
                    done((shift, seed, method), bench_cell(_seeded(cfg, seed), shift, method, protocol, machine_gflops, data, pretrained))
    else:  # each worker loads its own
        _run_parallel(cfg, cells, protocol, machine_gflops, pool, done)
    correlations: dict[str, Any] = {}
    for shift in shifts:
        name = f"{shift[0]}:{shift[1]}"
        study = [entry for cell in cells if cell[0] == shift for entry in results[cell][1]]
        correlations[name] = {**validator_correlations(study), "regret": mean_regret(rows, name)}
    if out is not None:
        write_rows(correlations, Path(out).with_suffix(".validators.json"))
    if on_correlations:
        on_correlations(correlations)
    return rows


def _labelled_shift(cfg: Config, shift: tuple[str, str], protocol: str):
    from udaflow.data.expectations import validate_shift
    from udaflow.data.manifest import DataError

    # the GX suites a run checks first: a target holding source images (leakage) or a file changed since its
    # ingest was benched, where `udaflow run` refuses it
    report = validate_shift(cfg.data.root, *shift, Path(cfg.work_dir) / "bench" / f"{shift[0]}-to-{shift[1]}" / "validation",
                            cfg.data.min_per_class)
    if not report.success:
        raise DataError(report.error(), report.hint())
    data = load_shift(cfg.data.root, *shift, image_spec(cfg), protocol, cfg.image_cache)  # type: ignore[arg-type]
    if data.target_eval is None:
        raise DataError(f"bench needs target labels to report accuracy; domain '{shift[1]}' has none",
                        "a bench scores every method on the target's labels: bench a labelled target (a folder per class), "
                        "or adapt to this one with `udaflow run`, whose gate needs no labels")
    return data


def _as_written(value: Any) -> Any:
    """A float that a float32 holds exactly (an accuracy or a loss computed in float32) as the shortest decimal
    that reads back as the same float32: `10.9`, where --out read `10.899999618530273`. Nothing is lost at
    float32's precision; a float64 figure keeps every digit. In nested dicts and lists too."""
    if isinstance(value, float):
        short = float(str(np.float32(value)))  # numpy prints the shortest round-trip digits
        return short if math.isfinite(value) and float(np.float32(value)) == value else value
    if isinstance(value, dict):
        return {k: _as_written(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_written(v) for v in value]
    return value


def settle_row(row: dict[str, Any]) -> dict[str, Any]:
    """A finished cell's row. A source model from the cache (an earlier bench's or run's) carries that
    training's seconds and images/s: its share of this bench's GEMM rate compared two states of the machine
    (a probe read 6.2%, 11%, 9.1% and 10% for one row in four benches), so it is left out (`cached_pretraining`;
    its achieved GFLOP/s stays, that training's own)."""
    if row.get("cached_pretraining") and "matmul_fraction" in row:
        row = {**row, "matmul_fraction": None}
    return row


def _seeded(cfg: Config, seed: int) -> Config:
    return cfg.model_copy(update={"seed": cfg.seed + seed})


def bench_cell(
    cfg: Config, shift: tuple[str, str], method: str, protocol: str, machine_gflops: float, data=None, pretrained=None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One (shift, method) at cfg.seed: its row and its checkpoints for the validator study. `data` and
    `pretrained` are loaded (the source model from its cache) when not given."""
    source, target = shift
    if data is None:
        data = load_shift(cfg.data.root, source, target, image_spec(cfg), protocol, cfg.image_cache)  # type: ignore[arg-type]
    if pretrained is None:
        pretrained = pretrain_source(cfg, data, source)
    cls = get_method_class(method)
    if method == "source_only":
        # a cached source model was scored and selected on whichever target pool first trained it
        stage, target_eval = (rescore_on_pool(cfg, pretrained, data) if pretrained.cached else pretrained), None
    elif cls.uses_target_labels:
        labelled = load_oracle_data(cfg.data.root, target, data.classes, image_spec(cfg), cfg.image_cache)
        stage = train_oracle(cfg, pretrained, labelled)
        target_eval = load_shift(cfg.data.root, source, target, image_spec(cfg), "holdout", cfg.image_cache).target_eval
    else:
        stage, target_eval = adapt_to_target(
            cfg, method, pretrained, data.source_train, data.target_adapt, source_val=data.source_val, keep_checkpoints=True,
        ), None
    metrics = evaluate_stage(cfg, stage, data, target_eval)
    row = {"shift": f"{source}:{target}", "method": method, "seed": cfg.seed, "protocol": protocol}
    row.update({k: metrics[k] for k in ROW_KEYS if k in metrics and k not in row})
    # DESIGN.md's row contract (`target_acc`, `source_val_acc`, `validators`): the figures of the
    # checkpoint `selected_by` picked, the one the pipeline registers; `_last` is the last iterate
    row.update({key: metrics[f"{key}_selected"] for key in CONTRACT_KEYS})
    if method == "source_only":
        row["cached_pretraining"] = stage.cached
    row.update(training_cost(cfg, stage, row["train_images_per_s"], machine_gflops))
    study: list[dict[str, Any]] = []
    if not cls.uses_target_labels:
        # the validator study: every kept checkpoint scored with target labels, AFTER training,
        # to report how well each label-free score tracks accuracy. Never used to select.
        checkpoints = checkpoint_study(cfg, stage, data)
        study = [{"method": method, "seed": cfg.seed, **c["scores"], "target_acc": c["target_acc"]} for c in checkpoints]
        if checkpoints:
            best = max(c["target_acc"] for c in checkpoints)
            row["best_checkpoint_target_acc"] = best  # reported, never used
            row["selection_loss"] = round(best - metrics["target_acc_selected"], 2)
            row.update(selection_report(checkpoints))
    else:
        row["protocol"] = "oracle: target-train labels, scored on target test"
    return row, study


def _cell_work(cfg: Config, method: str) -> float:
    """A rough relative cost, to start the longest cells first: label-only cells are short, cdtrans runs
    step_scale x the steps."""
    cls = get_method_class(method)
    if method == "source_only" or cls.uses_target_labels:
        return 0.5 if cls.uses_target_labels else 0.0
    return float((cfg.methods.get(method) or {}).get("step_scale", 1.0))


def _in_worker(task: Callable, cfg: Config, shift: tuple[str, str], *args):
    """Runs task(cfg, shift, *args) in a bench worker: progress lines named by the cell, and an error judged
    while its traceback is here (the parent re-raises it without it: a clear error stays one line)."""
    from udaflow.engine import plain_progress

    plain_progress(f"[{shift[0]}:{shift[1]} seed {cfg.seed}] ")
    try:
        return task(cfg, shift, *args)
    except Exception as exc:
        judged_here(exc)
        raise


def _check_shift(cfg: Config, shift: tuple[str, str], protocol: str) -> None:
    """`_labelled_shift` in a bench worker: the shift's GX suites pass and its target has labels (the data stays here)."""
    _labelled_shift(cfg, shift, protocol)


def _pretrain_cell(cfg: Config, shift: tuple[str, str], protocol: str) -> bool:
    """Trains (shift, cfg.seed)'s source model into the on-disk cache; True when it was there already."""
    data = load_shift(cfg.data.root, *shift, image_spec(cfg), protocol, cfg.image_cache)  # type: ignore[arg-type]
    return pretrain_source(cfg, data, shift[0]).cached  # into the on-disk cache the cells read


def _worker_start(num_threads: int, parent: int) -> None:
    # a bench killed by its pid alone (`kill`, `kill -9`, a scheduler) takes its workers with it,
    # instead of leaving them to train their cells to the end with no one to read the rows
    die_with_parent(parent)
    torch.set_num_threads(num_threads)


@contextmanager
def _workers(cfg: Config, jobs: int):
    """`jobs` bench worker processes (each with `train.num_threads`), for the `with` block's work."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_start, initargs=(cfg.train.num_threads, os.getpid()))
    try:
        yield pool
    except BaseException:
        # an error (or Ctrl-C) ends the bench now, not once the other workers' cells finish; the rows
        # done so far are already in --out
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _run_parallel(cfg: Config, cells: list[tuple], protocol: str, machine_gflops: float, pool, done: Callable) -> None:
    from concurrent.futures import FIRST_COMPLETED, wait

    # the source models first, each into the on-disk cache once; then every cell, the longest first
    # (all shifts' together), so no long cell starts last
    pretraining = {(shift, seed): pool.submit(_in_worker, _pretrain_cell, _seeded(cfg, seed), shift, protocol)
                   for shift, seed in dict.fromkeys((c[0], c[1]) for c in cells)}
    cached = {key: future.result() for key, future in pretraining.items()}  # a worker's error stops the bench here
    pending = {}
    for cell in sorted(cells, key=lambda c: -_cell_work(cfg, c[2])):  # stable: the cells' order among equals
        shift, seed, method = cell
        pending[pool.submit(_in_worker, bench_cell, _seeded(cfg, seed), shift, method, protocol, machine_gflops)] = cell
    while pending:
        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            cell = pending.pop(future)
            row, study = future.result()
            if "cached_pretraining" in row:  # the cell read the cache a worker had just filled
                row["cached_pretraining"] = cached[cell[:2]]
            done(cell, (row, study))


def training_cost(cfg: Config, stage, images_per_s: float, machine_gflops: float) -> dict[str, float]:
    """Training FLOPs per image (forward + backward), the GFLOP/s that achieved, its share of the GEMM rate,
    the device and dtype that rate is of (`matmul_on`: "cpu float32", or the GPU's name and bfloat16 under
    autocast) and the CPU (the same bits differ across CPU models; `costs.machine`)."""
    per_image = training_gflop_per_image(stage.classifier, image_spec(cfg).size)
    achieved = per_image * images_per_s
    return {
        "train_gflop_per_image": round(per_image, 6), "achieved_gflops": round(achieved, 1),
        "matmul_gflops": machine_gflops, "matmul_fraction": float(f"{achieved / machine_gflops:.3g}") if machine_gflops else None,
        "matmul_on": gemm_name(*training_matmul(stage.train.device, cfg.train.amp)),
        "cpu": cpu_name(),
    }


def checkpoint_study(cfg: Config, stage, data) -> list[dict[str, Any]]:
    """Every checkpoint the engine kept and scored: step, target accuracy (labels read here, after
    training), its validator scores plus EnsV over the run's checkpoints, and whether the method
    lets a validator select it (cdtrans's warm-up checkpoints are scored, never selected).

    The pool's logits are the ones the engine scored each checkpoint on, when it kept them for this
    pool (a run trained here, or a cached source model scored again on this pool by
    `experiment.rescore_on_pool`); in the transductive protocol the pool is the scored set, so accuracy
    reads them too. Otherwise the checkpoint predicts them again."""
    from udaflow.engine import accuracy, predict, resolve_device

    device = resolve_device(cfg.train.device)
    scores = {row["step"]: row for row in stage.train.validator_history}
    selectable_from = stage.train.extra.get("selectable_from", 0)
    states, stored = stage.train.checkpoint_states, stage.train.checkpoint_logits
    if len(stored) != len(states) or any(len(logits) != len(data.target_adapt) for logits in stored):
        stored = [None] * len(states)
    pool_is_scored = digest(data.target_adapt.images) == digest(data.target_eval.images)
    out, pool_logits = [], []
    for (step, state), logits in zip(states, stored):
        if step not in scores:
            continue
        if logits is None or not pool_is_scored:
            stage.classifier.load_state_dict(state)
            stage.classifier.to(device)
        if logits is None:
            logits = predict(stage.classifier, data.target_adapt.images, device, amp=cfg.train.amp)[1]  # label-free, as training scored
        pool_logits.append(logits)
        scored = logits if pool_is_scored else predict(stage.classifier, data.target_eval.images, device, amp=cfg.train.amp)[1]
        acc = accuracy(scored, data.target_eval.labels)
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
    try:
        tmp.write_text(json.dumps(_as_written(rows), indent=2) + "\n")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; left by a failed one
