"""The `udaflow` command.

Errors a person can fix (bad params, bad data, unknown names) print one line plus a hint and exit
with code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Transformer unsupervised domain adaptation, run as a pipeline.", no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Build and import domains under data/raw.", no_args_is_help=True)
app.add_typer(data_app, name="data")
# piped output (CI logs, `| tee`) gets full-width tables instead of rich's 80-column default
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

_STATE = {"debug": False}

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file (every run parameter)")]
ProfileOpt = Annotated[Optional[str], typer.Option("--profile", help="quick | full (profiles in params.yaml)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a parameter: key.path=value (repeatable)")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N")]


def setup_environment() -> None:
    """Offline hygiene for every entry point: no telemetry, never reach a model hub."""
    for key, value in {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "GX_ANALYTICS_ENABLED": "False",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }.items():
        os.environ.setdefault(key, value)


def _fail(exc: BaseException, hint: str | None = None) -> None:
    if _STATE["debug"]:
        raise exc
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    if hint:
        err_console.print(f"hint: {hint}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _known_errors():
    from udaflow.config import ConfigError
    from udaflow.data.manifest import DataError
    from udaflow.methods import UnknownMethodError
    from udaflow.models import BackboneError

    return (ConfigError, DataError, UnknownMethodError, BackboneError, ValueError, FileNotFoundError, RuntimeError)


def _load(params: Path, profile: str | None, overrides: list[str] | None, **extra: str | None):
    from udaflow.config import load_config

    sets = list(overrides or [])
    sets += [f"{k}={v}" for k, v in extra.items() if v is not None]
    return load_config(params, profile, sets)


@app.callback()
def main_options(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    _STATE["debug"] = debug


@data_app.command("build")
def data_build(
    domains: Annotated[str, typer.Option("--domains", help="comma-separated built-in domains")] = "synth,mnist,mnistm",
    seed: Annotated[int, typer.Option("--seed", help="rendering / split seed")] = 0,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Build the built-in domains (synth, mnist, mnistm) as ImageFolder PNGs + manifests."""
    try:
        from udaflow.data.domains import BUILTIN_DOMAINS, build_domain

        cfg = _load(params, None, None)
        names = [d.strip() for d in domains.split(",") if d.strip()]
        unknown = [d for d in names if d not in BUILTIN_DOMAINS]
        if unknown:
            raise ValueError(f"unknown built-in domain(s) {unknown} (known: {', '.join(BUILTIN_DOMAINS)})")
        for name in names:
            t0 = time.perf_counter()
            out = build_domain(name, cfg.data.root, seed=seed, synth_size=cfg.data.synth_size, holdout_fraction=cfg.data.holdout_fraction)
            n = sum(1 for _ in (out / "manifest.csv").open()) - 1
            console.print(f"built [bold]{name}[/]: {n} images in {out} ({time.perf_counter() - t0:.1f}s)")
    except _known_errors() as exc:
        _fail(exc)


@data_app.command("ingest")
def data_ingest(
    path: Annotated[Path, typer.Argument(help="an ImageFolder (<class>/<image>) or a flat folder of images")],
    name: Annotated[str, typer.Option("--name", help="domain name under data/raw")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Import a user's image folder as a domain (copied under data/raw/NAME with a manifest)."""
    try:
        from udaflow.data.ingest import ingest_folder

        cfg = _load(params, None, None)
        out = ingest_folder(path, name, cfg.data.root, cfg.data.holdout_fraction, cfg.seed)
        n = sum(1 for _ in (out / "manifest.csv").open()) - 1
        console.print(f"ingested [bold]{name}[/]: {n} images in {out}")
    except _known_errors() as exc:
        _fail(exc, "an ImageFolder has one sub-folder per class; a flat folder is an unlabelled target")


@app.command("run")
def run(
    source: Annotated[Optional[str], typer.Option("--source", help="labelled source domain")] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="unlabelled target domain")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="adaptation method")] = None,
    profile: ProfileOpt = None,
    overrides: SetOpt = None,
    device: DeviceOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Pretrain on the source (cached), adapt to the target, evaluate; print a summary."""
    try:
        import torch

        from udaflow.data.datasets import load_shift
        from udaflow.experiment import adapt_to_target, evaluate_stage, pretrain_source
        from udaflow.methods import get_method_class

        cfg = _load(params, profile, overrides, **{"source": source, "target": target, "method": method, "train.device": device})
        get_method_class(cfg.method)
        t0 = time.perf_counter()
        data = load_shift(cfg.data.root, cfg.source, cfg.target, cfg.data.image_size, "holdout")
        t_load = time.perf_counter() - t0
        pretrained = pretrain_source(cfg, data, cfg.source)
        console.print(
            f"source model: {'reused cached checkpoint' if pretrained.cached else 'trained'} ({pretrained.info['cache']})"
        )
        run_dir = cfg.work_dir / f"{cfg.source}-to-{cfg.target}" / cfg.method
        adapted = adapt_to_target(cfg, cfg.method, pretrained, data.source_train, data.target_adapt, run_dir / "checkpoint.pt")
        metrics = evaluate_stage(cfg, adapted, data)
        source_metrics = evaluate_stage(cfg, pretrained, data)
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(adapted.train.selected_state, run_dir / "model_selected.pt")
        torch.save(adapted.train.last_state, run_dir / "model_last.pt")
        summary = {
            "source": cfg.source, "target": cfg.target, "method": cfg.method, "seed": cfg.seed,
            "source_only": {k: source_metrics.get(k) for k in ("target_acc", "target_acc_selected", "source_val_acc")},
            **{k: v for k, v in metrics.items() if k != "target_per_class_acc"},
            "target_per_class_acc": metrics.get("target_per_class_acc"),
            "stage_seconds": {"load": round(t_load, 2), "pretrain": round(pretrained.wall_seconds, 2), "adapt": round(adapted.wall_seconds, 2)},
        }
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
        _print_run_summary(summary, run_dir)
    except _known_errors() as exc:
        _fail(exc, "domains come from `udaflow data build` or `udaflow data ingest`; keys and defaults are in params.yaml")


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def _print_run_summary(s: dict, run_dir: Path) -> None:
    table = Table(title=f"{s['source']} -> {s['target']} with {s['method']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("target accuracy (last iterate)", _fmt(s.get("target_acc")))
    table.add_row(f"target accuracy (selected by {s['selected_by']}, step {s['selected_step']})", _fmt(s.get("target_acc_selected")))
    table.add_row("source-only target accuracy", _fmt(s["source_only"].get("target_acc")))
    table.add_row("source val accuracy", _fmt(s.get("source_val_acc")))
    for name, value in s["validators"].items():
        table.add_row(f"validator {name}", _fmt(value))
    for stage, sec in s["stage_seconds"].items():
        table.add_row(f"seconds: {stage}", _fmt(sec))
    table.add_row("train images/s", _fmt(s.get("train_images_per_s")))
    table.add_row("outputs", str(run_dir))
    console.print(table)


@app.command("bench")
def bench(
    shifts: Annotated[str, typer.Option("--shifts", help="SOURCE:TARGET[,SOURCE:TARGET...]")] = "synth:mnist,mnist:mnistm",
    methods: Annotated[str, typer.Option("--methods", help="comma-separated method names")] = "source_only,oracle,dann,cdan,mcc,cdtrans",
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="seeds per (shift, method)")] = 1,
    profile: ProfileOpt = "quick",
    protocol: Annotated[str, typer.Option("--protocol", help="transductive | holdout")] = "transductive",
    out: Annotated[Path, typer.Option("--out", help="JSON rows are written here")] = Path("bench.json"),
    overrides: SetOpt = None,
    device: DeviceOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Benchmark methods on shifts; prints a table and writes one JSON row per (shift, method, seed)."""
    try:
        from udaflow.bench import parse_shifts, run_bench

        if protocol not in ("transductive", "holdout"):
            raise ValueError(f"--protocol {protocol!r}: use transductive or holdout")
        cfg = _load(params, profile, overrides, **{"train.device": device})
        method_list = [m.strip() for m in methods.split(",") if m.strip()]
        t0 = time.perf_counter()

        def show(row):
            console.print(
                f"{row['shift']:>14} {row['method']:>12} seed {row['seed']}: target {_fmt(row.get('target_acc'))} "
                f"(selected {_fmt(row.get('target_acc_selected'))}), source val {_fmt(row['source_val_acc'])}, "
                f"{row['seconds']:.0f}s, {row['train_images_per_s']:.0f} img/s"
            )

        rows = run_bench(cfg, parse_shifts(shifts), method_list, seeds, protocol, out, on_row=show)
        _print_bench_table(rows)
        console.print(f"{len(rows)} rows -> {out} ({time.perf_counter() - t0:.0f}s in all)")
    except _known_errors() as exc:
        _fail(exc)


def _print_bench_table(rows: list[dict]) -> None:
    table = Table(title="udaflow bench")
    for col in ("shift", "method", "seed", "target_acc", "target_acc_selected", "selected_by", "source_val_acc", "seconds", "img/s", "device"):
        table.add_column(col, justify="right" if col not in ("shift", "method", "selected_by") else "left")
    for r in rows:
        table.add_row(
            r["shift"], r["method"], str(r["seed"]), _fmt(r.get("target_acc")), _fmt(r.get("target_acc_selected")),
            r["selected_by"], _fmt(r["source_val_acc"]), _fmt(r["seconds"]), _fmt(r["train_images_per_s"]), r["device"],
        )
    console.print(table)


def main() -> None:
    setup_environment()
    app()


if __name__ == "__main__":
    main()
