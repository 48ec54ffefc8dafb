"""The `udaflow` command.

Errors a person can fix (bad params, bad data, unknown names, a model or run that does not exist)
print one line plus a hint and exit with code 2; `--debug` prints the traceback before them. One place
does this for every command (`_Commands.invoke`); any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from udaflow.environment import setup_environment
from udaflow.errors import chain, disk_full, raised_on_purpose

_STATE = {"debug": False}


class NotFound(LookupError):
    """A model or run the command names does not exist: checked before any flow starts."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


# a known error without a hint of its own gets its command's
_HINTS = {
    "reproduce": "run ids are in `udaflow run`'s summary and the MLflow UI (`udaflow ui`)",
    "promote": "list registered models with `udaflow ui`",
    "rollback": "a rollback needs at least two promotions in the model's history",
    "data": "built-in domains: `udaflow data build` (synth, mnist, mnistm); your own images, a folder per class: "
            "`udaflow data ingest DIR --name NAME` (`udaflow data ingest --help`)",
    "run": "every parameter and its default is in params.yaml (`--set key=value` overrides one); "
           "the domains are the folders under data.root (`udaflow data build`, `udaflow data ingest`)",
    "schedule": "schedules need a running Prefect server: `prefect server start`, then "
                "export PREFECT_API_URL=http://127.0.0.1:4200/api",
    "bench": "e.g. `udaflow bench --shifts synth:mnist,mnist:mnistm --methods source_only,adamatch`; "
             "the methods are the files in src/udaflow/methods/",
}
_CONFIG_HINT = "keys and defaults are in params.yaml; each method's options and their ranges are its Config (src/udaflow/methods/)"


_ERROR_TYPES = (  # udaflow's error types, by module
    ("udaflow.config", "ConfigError"), ("udaflow.data.manifest", "DataError"), ("udaflow.methods", "UnknownMethodError"),
    ("udaflow.models.backbone", "BackboneError"), ("udaflow.versioning", "VersioningError"), ("udaflow.tracking", "ModelUnreadable"),
)


def _error_types() -> tuple[type[BaseException], ...]:
    """The error types of the modules loaded so far: one that was never imported raised nothing
    (so a failing command does not import torch just to check)."""
    loaded = [getattr(sys.modules[mod], name) for mod, name in _ERROR_TYPES if mod in sys.modules]
    return (NotFound, *loaded)


def _is_known(exc: Exception) -> bool:
    """udaflow's error types, or a ValueError / RuntimeError / FileNotFoundError / LookupError
    that udaflow's own code raised on purpose; never a KeyError, IndexError or NotImplementedError."""
    if isinstance(exc, _error_types()):
        return True
    if isinstance(exc, (KeyError, IndexError, NotImplementedError)):
        return False
    return isinstance(exc, (ValueError, RuntimeError, FileNotFoundError, LookupError)) and raised_on_purpose(exc)


def _unreachable(exc: BaseException | None) -> tuple[str, BaseException] | None:
    """(the server's address, the error) when `exc`'s chain holds a failed connection to a server
    (Prefect's client speaks httpx, MLflow's requests): a server that is down or misnamed, not a bug."""
    kinds = [m.TransportError for m in [sys.modules.get("httpx")] if m is not None]
    kinds += [m.exceptions.ConnectionError for m in [sys.modules.get("requests")] if m is not None]
    failed = next((e for e in chain(exc) if kinds and isinstance(e, tuple(kinds))), None)
    if failed is None:
        return _database_unreachable(exc)
    try:
        url = str(failed.request.url) if getattr(failed, "request", None) is not None else ""
    except RuntimeError:  # httpx: an error raised without its request
        url = ""
    match = re.match(r"^[a-z+]+://[^/]+", url)
    return (match.group(0) if match else "its server"), failed


# a database server's connection failures as the drivers word them (psycopg, pymysql / mysqlclient): not SQLite's
# "database is locked" or a broken schema, which are OperationalErrors too
_DATABASE_DOWN = re.compile(r"connection (?:failed|refused|timed out)|could not connect|could not translate host name|"
                            r"can't connect to mysql server|name or service not known", re.IGNORECASE)


def _database_unreachable(exc: BaseException | None) -> tuple[str, BaseException] | None:
    """(the database's address, the error) when `exc`'s chain holds SQLAlchemy's failure to connect to the
    MLflow store's database server (tracking.uri postgresql://..., mysql://...): MLflow retried for about 100 s,
    then the CLI printed a traceback."""
    errors = sys.modules.get("sqlalchemy.exc")
    failed = next((e for e in chain(exc) if errors is not None and isinstance(e, errors.OperationalError)
                   and _DATABASE_DOWN.search(str(e))), None)
    if failed is None:
        return None
    from urllib.parse import urlsplit

    from udaflow import tracking

    uri = urlsplit(tracking.mlflow_uri())
    host = uri.netloc.rpartition("@")[2]  # never the user and password
    return (f"{uri.scheme}://{host}" if host else "the MLflow store's database"), failed


_UNREACHABLE_HINT = ("is it running, and named right? PREFECT_API_URL (or the Prefect profile's) names the Prefect server, "
                     "MLFLOW_TRACKING_URI (or params.yaml's tracking.uri) the MLflow one; start it, or unset the variable to "
                     "run on this machine alone")


_DISK_FULL_HINT = ("free space on that disk (`df -h` shows which): `dvc gc` drops DVC cache objects no version uses, and "
                   "runs/cache holds decoded images and source models that are rebuilt on demand; then run the same "
                   "command again (a run resumes from its last checkpoint, an ingest starts over: it changed nothing)")


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job's timeout, `kill`) where a command turns it into an interruption."""


@contextlib.contextmanager
def _terminated_as_interrupted():
    """SIGTERM as Ctrl-C while the block runs: a bench a CI timeout ended exited 143 without a word, where Ctrl-C
    says where the rows done so far are (the same line, and the shell's 128 + SIGTERM)."""
    import signal

    def stop(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)  # None: a handler set from C


_INTERRUPTED = {  # what a Ctrl-C leaves, per command
    # stopped inside registration, a complete version may exist without a summary to say so
    "run": ("the same command resumes from the last checkpoint (saved every train.checkpoint_every steps; a run stopped "
            "before the first starts over); a version registered before the stop (MLflow's \"Created version\") is taken "
            "up by it for the gate, not registered again"),
    "reproduce": ("the same command resumes from the last checkpoint (saved every train.checkpoint_every steps; a run "
                  "stopped before the first starts over)"),
    "bench": "the rows done so far are in --out",
    # `udaflow stage ...`, as dvc.yaml calls it: DVC removed the stage's outputs before it ran
    # a replace past its commit point (DVC recorded the new version) is not rolled back: a probe could not tell
    "data ingest": ("an ingest stopped before DVC recorded the new version left the domain as it was; one stopped after keeps "
                    "it (its pointer in `git status`), and the same command again announces it (drift, retrain "
                    "trigger) if it was not yet"),
    "stage": ("`dvc repro` runs the stage again (adaptation from its last checkpoint); until then its outputs are "
              "missing (`dvc checkout` brings back the ones dvc.lock records)"),
}


def _report(exc: Exception, command: str | None) -> None:
    """One line for a known error, then the error's own hint (or its kind's, or its command's)."""
    from udaflow.config import ConfigError
    from udaflow.data.manifest import DataError

    if isinstance(exc, DataError) and command != "run":  # a domain's error: not the Prefect server's, the options' or the registry's
        command = "data"
    hint = getattr(exc, "hint", None) or (_CONFIG_HINT if isinstance(exc, ConfigError) else _HINTS.get(command or ""))
    err_console.print(Text.assemble(("error:", "bold red"), f" {exc}"), highlight=False, soft_wrap=True)  # Text: no markup in messages
    if hint:
        err_console.print(Text(f"hint: {hint}"), highlight=False, soft_wrap=True)


class _Commands(TyperGroup):
    """The root command group: every command runs inside its `invoke`, the one place that turns a
    known error into `error: <one line>` (+ `hint:`) and exit code 2 (under --debug after its traceback).
    Any other exception propagates with its traceback."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # `--debug` is the root's option; users also type it after the command (`udaflow run ... --debug`)
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[:end]:
            args = ["--debug"] + [a for i, a in enumerate(args) if a != "--debug" or i >= end]
        return super().parse_args(ctx, args)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Usage errors (an unknown option, a value out of range, a missing argument) in the CLI's one-line
        form, `error:` + `hint:`, exit 2: typer drew them as a box of rich panels under the usage line."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)  # typer returns an Exit's code here
        except (click.ClickException, typer.TyperException) as exc:  # typer 0.29 raises its own copy of click's
            if not hasattr(exc, "format_message"):
                raise
            if type(exc).__name__ != "NoArgsIsHelpError":  # `udaflow` alone: typer printed the help already
                where = getattr(getattr(exc, "ctx", None), "command_path", None) or "udaflow"
                err_console.print(Text.assemble(("error:", "bold red"), f" {exc.format_message()}"), highlight=False, soft_wrap=True)
                err_console.print(Text(f"hint: `{where} --help` lists its options and commands"), highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Abort, typer.Abort):
            err_console.print("Aborted!", highlight=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context):
        nested = next((word for word in ctx.args if not word.startswith("-")), "")  # `ingest` of `data ingest` (click consumes ctx.args)
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, typer.Exit, typer.Abort):
            raise  # exit codes, Ctrl-C and usage errors: click's own handling (typer's Exit is a RuntimeError of its own, not click's)
        except Exception as exc:
            if _STATE["debug"] and (_is_known(exc) or disk_full(exc) is not None or _unreachable(exc) is not None):
                # --debug: the traceback first, then the same lines and exit code 2 (it exited 1, as a bug, and a
                # script that tells a data error (2) from a crash (1) read a debug run's data error as a crash)
                err_console.print_exception()
            if (full := disk_full(exc)) is not None:  # not a bug: the machine's, said in one line
                where = f" writing {full.filename}" if full.filename else ""
                err_console.print(Text.assemble(("error:", "bold red"), f" {full.strerror or 'no space left on device'}{where}"),
                                  highlight=False, soft_wrap=True)
                err_console.print(Text(f"hint: {_DISK_FULL_HINT}"), highlight=False, soft_wrap=True)
                raise typer.Exit(code=2) from None
            if (down := _unreachable(exc)) is not None:
                what = str(down[1]).strip().splitlines()[0][:200] if str(down[1]).strip() else type(down[1]).__name__
                err_console.print(Text.assemble(("error:", "bold red"), f" cannot reach {down[0]}: {what}"), highlight=False, soft_wrap=True)
                err_console.print(Text(f"hint: {getattr(exc, 'hint', None) or _UNREACHABLE_HINT}"), highlight=False, soft_wrap=True)
                raise typer.Exit(code=2) from None
            if not _is_known(exc):
                raise
            _report(exc, ctx.invoked_subcommand)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt as stop:  # Ctrl-C: one line and the shell's 128 + SIGINT, not the traceback of wherever it landed
            if _STATE["debug"]:  # where it landed, then the same line and exit code (typer made it a silent exit 130)
                err_console.print_exception()
            after = _INTERRUPTED.get(f"{ctx.invoked_subcommand} {nested}") or _INTERRUPTED.get(ctx.invoked_subcommand or "")
            what = "terminated" if isinstance(stop, _Terminated) else "interrupted"
            err_console.print(Text.assemble((what, "bold red"), f": {after}" if after else ""), highlight=False, soft_wrap=True)
            raise typer.Exit(code=143 if isinstance(stop, _Terminated) else 130) from None


app = typer.Typer(
    cls=_Commands, help="Transformer unsupervised domain adaptation, run as a pipeline.", no_args_is_help=True, add_completion=False,
)
data_app = typer.Typer(help="Build and import domains under data/raw.", no_args_is_help=True)
app.add_typer(data_app, name="data")
# piped output (CI logs, `| tee`) gets full-width tables instead of rich's 80-column default
console = Console(width=None if sys.stdout.isatty() else 160, soft_wrap=not sys.stdout.isatty())
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160, soft_wrap=not sys.stderr.isatty())

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file (every run parameter)")]
ProfileOpt = Annotated[Optional[str], typer.Option("--profile", help="quick | full (profiles in params.yaml)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a parameter: key.path=value (repeatable)")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N")]


def _load(params: Path, profile: str | None, overrides: list[str] | None, flags: dict[str, str] | None = None,
          trains: bool = False, **extra: str | None):
    """params + profile + --set overrides + the command's options (`extra`: key -> value). An option's
    value is checked as its key, and an error names the option (`--device: train.device: ...`), or
    `flags[key]` when the value came from another (promote's source and target, from --model). A command
    that `trains` (run, bench, schedule) warns of the keys its file left to the code's defaults."""
    from udaflow.config import load_config

    sets = list(overrides or [])
    sets += [f"{k}={v}" for k, v in extra.items() if v is not None]
    named = {k: f"--{k.rsplit('.', 1)[-1]}" for k, v in extra.items() if v is not None}
    cfg = load_config(params, profile, sets, flags={**named, **(flags or {})})
    if trains:
        _warn_left_to_defaults(cfg, params)
    return cfg


_WARNED: set[str] = set()


def _warn_left_to_defaults(cfg, params: Path) -> None:
    """A `--params` file other than this folder's params.yaml that leaves out keys params.yaml sets: one
    warning before anything runs, naming them with both values (config.left_to_defaults says why)."""
    from udaflow.config import ConfigError, left_to_defaults, load_config

    project = Path.cwd() / "params.yaml"
    if not project.is_file() or Path(params).resolve() == project.resolve() or str(params) in _WARNED:
        return
    _WARNED.add(str(params))  # once a command: promote reads its params twice
    try:
        theirs = load_config(project)
    except ConfigError:
        return  # not this command's file: its errors are for the run that reads it
    left = left_to_defaults(cfg, theirs)
    if left:
        shown = "; ".join(f"{k} {ours!r} (params.yaml: {value!r})" for k, ours, value in left[:4])
        more = f"; and {len(left) - 4} more" if len(left) > 4 else ""
        err_console.print(f"warning: {params} leaves out {len(left)} key(s) params.yaml sets, which take the code's defaults: "
                          f"{shown}{more}. The code's defaults are the plain methods, not params.yaml's recipe: copy "
                          "params.yaml and change what you need, or add the keys", highlight=False, markup=False, soft_wrap=True)


@app.callback()
def main_options(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    _STATE["debug"] = debug


@data_app.command("build")
def data_build(
    domains: Annotated[str, typer.Option("--domains", help="comma-separated built-in domains")] = "synth,mnist,mnistm",
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, help="rendering / split seed (params.yaml's data.build_seed, which it must match)")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Build the built-in domains (synth, mnist, mnistm) as ImageFolder PNGs + manifests."""
    from udaflow.data.domains import BUILTIN_DOMAINS, build_domain

    from udaflow.config import ConfigError

    cfg = _load(params, None, None)
    if seed is not None and seed != cfg.data.build_seed:
        # the domains are dvc.yaml's build stages, which build with params.yaml's seed: data from another
        # seed would be recorded in dvc.lock as theirs, and `dvc repro` would silently build it back
        raise ConfigError(
            f"--seed {seed}: the built-in domains are built with params.yaml's data.build_seed ({cfg.data.build_seed}), "
            "so that dvc.lock records how `dvc repro` rebuilds them",
            hint=f"set data.build_seed: {seed} in {params}, then `udaflow data build` (or `dvc repro`)",
        )
    seed = cfg.data.build_seed
    names = [d.strip() for d in domains.split(",") if d.strip()]
    unknown = [d for d in names if d not in BUILTIN_DOMAINS]
    if not names:
        raise ValueError(f"--domains names no domain (known: {', '.join(BUILTIN_DOMAINS)})")
    if unknown:
        raise ValueError(f"unknown built-in domain(s) {', '.join(repr(d) for d in unknown)} (known: {', '.join(BUILTIN_DOMAINS)})")
    from udaflow import versioning

    for name in names:
        t0 = time.perf_counter()
        with versioning.replacing_domain(Path(cfg.data.root) / name):  # not under a run reading it (dvc.yaml: persist)
            out = build_domain(name, cfg.data.root, seed=seed, synth_size=cfg.data.synth_size, holdout_fraction=cfg.data.holdout_fraction)
        n = sum(1 for _ in (out / "manifest.csv").open()) - 1
        console.print(f"built [bold]{name}[/]: {n} images in {out} ({time.perf_counter() - t0:.1f}s)")
        _version(out)


def _version(folder: Path) -> None:
    """Record a domain folder in DVC (skipped inside `dvc repro`, which records stage outputs itself)."""
    from udaflow import versioning

    if versioning.inside_dvc_stage():
        return None
    version = versioning.version_dataset(folder)
    state = "new version" if version.changed else "unchanged"
    console.print(f"  dvc: {version.path} {version.md5} ({state}; recorded in {version.pointer}, pushed to the default remote)")
    return version


def _drift(cfg, name: str, md5: str) -> tuple[str, dict[str, dict], dict[str, str]]:
    """Measure the new version of domain `name` against the data each model targeting it was adapted
    on (its champion's), log a `drift` run per model, print each decision. Returns the event's verdict
    ('shifted': retrain, 'unshifted': don't, 'no-champion' or 'unmeasured': nothing to compare, retrain),
    the figures and each model's own verdict (a retrain of a model whose own verdict is 'unshifted'
    skips, though another model's shift fired the event)."""
    from udaflow import steps, tracking

    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        console.print("  drift: no MLflow store yet, no champion to compare with: a retrain may run")
        return "no-champion", {}, {}
    tracking.configure(uri, Path(cfg.tracking.artifact_root))
    verdicts, figures, per_model = [], {}, {}
    try:
        sources = tracking.models_for_target(name)
    except Exception as exc:  # noqa: BLE001 - the data is versioned already: the announcement must still go out
        err_console.print(f"warning: the models targeting '{name}' could not be listed from {uri} "
                          f"({type(exc).__name__}: {str(exc)[:300]}): drift not measured, retrain", highlight=False)
        return "unmeasured", figures, per_model
    for source in sources:
        shift_cfg = cfg.model_copy(update={"source": source, "target": name})
        model = tracking.model_name(source, name)
        _warn_unknown_classes(cfg, source, name, model)
        try:
            report = steps.drift(shift_cfg)
            run_id = None if report is None else tracking.log_drift(source, name, md5, report.figures(), report.as_dict())
        except Exception as exc:  # noqa: BLE001 - the data is versioned already: say why, and let the retrain decide
            err_console.print(f"warning: drift vs {model} not measured ({type(exc).__name__}: {str(exc)[:300]}): retrain", highlight=False)
            verdicts.append(per_model.setdefault(model, "unmeasured"))
            continue
        if report is None:
            console.print(f"  drift vs {model}: it has no champion, nothing to compare with: retrain", highlight=False)
            verdicts.append(per_model.setdefault(model, "no-champion"))
            continue
        figures[model] = {k.removeprefix("drift."): round(v, 6) for k, v in report.figures().items()}
        console.print(
            f"  drift vs {model}@champion ({report.n_reference} vs {report.n_new} images): PAD {report.pad:.3f}, "
            f"MMD^2 {report.mmd:.4f} (p = {report.mmd_p_value:.3g}), {report.validator} {report.validator_reference:.3f} -> "
            f"{report.validator_new:.3f}", highlight=False,
        )
        console.print(f"    {'retrain' if report.retrain else 'no retrain'}: {report.reason} (MLflow run {run_id})", highlight=False)
        verdicts.append(per_model.setdefault(model, "shifted" if report.retrain else "unshifted"))
    if not verdicts:
        console.print(f"  drift: no registered model targets '{name}' yet: a retrain may run")
        return "no-champion", figures, per_model
    verdict = next((v for v in ("shifted", "unmeasured", "no-champion") if v in verdicts), "unshifted")
    return verdict, figures, per_model


def _classes(names: list[str], most: int = 8) -> str:
    """Class names as a warning lists them: quoted, the first `most`, then '...'."""
    return ", ".join(f"'{c}'" for c in names[:most]) + (" ..." if len(names) > most else "")


def _warn_unknown_classes(cfg, source: str, name: str, model: str) -> None:
    """A new version of a target ingested without --source is checked alone: a class its source lacks
    passed, and the model's retrains (the one this ingest triggers included) then refused the target.
    Say so now, once per model targeting it; the version stays (the user may be adding the class to the
    source next)."""
    from udaflow.data.datasets import Domain

    try:
        unknown = sorted(set(Domain.open(cfg.data.root, name).classes) - set(Domain.open(cfg.data.root, source).classes))
    except Exception:  # noqa: BLE001 - a source that is gone: its retrain says so itself
        return
    if unknown:
        err_console.print(f"warning: class(es) {_classes(unknown)} of '{name}' are not among source '{source}''s classes: {model}'s "
                          f"retrains will refuse this version (check it with `--source {source}`; add the class(es) to "
                          f"'{source}', or bring the previous version back)", highlight=False, soft_wrap=True)


_ANNOUNCE_HINT = ("the new version is recorded, its announcement (drift, retrain trigger) is not: once the server "
                  "answers (PREFECT_API_URL names Prefect's, MLFLOW_TRACKING_URI or params.yaml's tracking.uri MLflow's; "
                  "unset PREFECT_API_URL to go without Prefect), run the same `udaflow data ingest` again: it announces "
                  "the recorded version")


def _announce_new_data(cfg, name: str, md5: str) -> None:
    """A new DVC version of a domain: measure its drift, then a Prefect event carrying the figures;
    deployments whose target it is retrain when it is shifted (or nothing can be compared). A named
    server that does not answer, or does not take the event, is an error: the caller records the
    announcement only when this returns."""
    from tasks import named_prefect_api

    server = named_prefect_api()
    try:
        if server is not None:
            from flows.schedule import reach_server

            reach_server()  # before the drift run is measured and logged, not after
        verdict, figures, per_model = _drift(cfg, name, md5)
        if server is None:
            console.print("  no Prefect server (PREFECT_API_URL unset): no retrain triggered")
            return
        from flows.schedule import emit_dataset_updated

        emit_dataset_updated(name, md5, verdict, figures, per_model)
    except Exception as exc:
        if not getattr(exc, "hint", None):  # an error's own hint says more than the general one
            with contextlib.suppress(AttributeError):
                exc.hint = _ANNOUNCE_HINT
        raise
    console.print(f"  event udaflow.dataset.updated (drift: {verdict}) emitted for '{name}': {_retrain_outlook(verdict, per_model)}",
                  highlight=False, soft_wrap=True)


def _retrain_outlook(verdict: str, per_model: dict[str, str]) -> str:
    """What the event's deployments will do: the retrain of a model whose own drift check saw no shift skips
    (flows/retrain.py), whatever another model's verdict fired the event."""
    if verdict == "unshifted":
        return "no shift: its scheduled retrains stay idle"
    idle = sorted(m for m, v in per_model.items() if v == "unshifted")
    if not idle:
        return "its scheduled retrains will run"
    run = ", ".join(f"{m} ({v})" for m, v in sorted(per_model.items()) if v != "unshifted")
    return f"the scheduled retrains of {run} will run; {', '.join(idle)} saw no shift: theirs skip"


def _warn_partial_target(name: str, source: str, absent: list[str], has_val: bool) -> None:
    """A target holding only some of its source's classes (partial-set adaptation): a probe's 5-of-28-class target
    was adapted to 30.00% against its source-only model's 60.00%, and promoted on IM as the first version."""
    then = ("its labelled val split lets the gate judge a run by accuracy" if has_val else
            "a labelled val split (--val-fraction) lets the gate judge a run by accuracy; without one it reads the validator alone")
    err_console.print(f"warning: '{name}' has no image of {len(absent)} of source '{source}''s classes ({_classes(absent)}): udaflow's methods and its "
                      "validators assume the target holds every source class (adamatch aligns the target's predictions to the "
                      f"source's class mix, IM rewards spreading them over all of its classes), so a run may do worse than the source "
                      f"model; {then}", highlight=False, soft_wrap=True)


@data_app.command("ingest")
def data_ingest(
    path: Annotated[Path, typer.Argument(help="an ImageFolder (<class>/<image>) or a flat folder of images")],
    name: Annotated[str, typer.Option("--name", help="domain name under data/raw")],
    source: Annotated[Optional[str], typer.Option("--source", help="also check it as a target of this source domain (its classes, leakage)")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="make this folder the new version of an existing domain")] = False,
    val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.0, max=0.9, help=(
        "keep this fraction of each class as a labelled `val` split: a target's val split is what the promotion "
        "gate compares (instead of the label-free validator); never trained on, never reported"))] = 0.0,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Import a user's image folder as a domain: validated (GX), then versioned (DVC); all or nothing."""
    from udaflow.data.ingest import ingest_domain

    from udaflow.data.manifest import DataError

    cfg = _load(params, None, None)
    try:
        result = ingest_domain(
            path, name, Path(cfg.data.root), source=source, replace=replace, holdout_fraction=cfg.data.holdout_fraction,
            seed=cfg.seed, min_per_class=cfg.data.min_per_class, report_dir=Path(cfg.work_dir) / "ingest" / name / "validation",
            progress=lambda line: console.print(f"  {line}", highlight=False), val_fraction=val_fraction,
        )
    except DataError as exc:  # the message names the file or option; `data`'s general hint (how to build or ingest) is beside the point
        exc.hint = exc.hint or "the ingest changed nothing: fix what the error names, then run the same command again"
        raise
    kind = "labelled" if result.labelled else "unlabelled"
    checks = f"validated on its own and as a target of '{source}'" if source else "validated on its own"
    console.print(f"ingested [bold]{name}[/]: {result.images} {kind} images in {result.path}, {checks}")
    if result.labelled:
        console.print("  splits: " + ", ".join(f"{split} {n}" for split, n in result.splits.items()), highlight=False)
    if result.classes_without_val:
        err_console.print(f"warning: no val image of class(es) {_classes(result.classes_without_val)}: too few images for --val-fraction {val_fraction}; "
                          "the gate's val accuracy leaves them out", highlight=False, soft_wrap=True)
    for overlap in result.overlaps:
        err_console.print(f"warning: {overlap.describe(name)}", highlight=False, soft_wrap=True)
    if result.source_classes_absent:
        _warn_partial_target(name, source, result.source_classes_absent, has_val=result.splits.get("val", 0) > 0)
    if result.classes_gone or result.classes_new:  # a probe's source lost two classes on a replace, unsaid
        gone, new = (_classes(c) if c else "none" for c in (result.classes_gone, result.classes_new))
        err_console.print(f"warning: '{name}' now has other classes than the version it replaced (gone: {gone}; new: {new}): a model trained with the previous version as its source no longer "
                          "matches it, and its gate and retrains refuse it until that version is back", highlight=False, soft_wrap=True)
    state = "unchanged" if not result.changed else (
        f"an earlier version again, as commit {result.earlier_commit} recorded it" if result.earlier_commit else "new version")
    console.print(f"  dvc: {result.pointer} -> {result.md5} ({state}; pushed to the default remote)", highlight=False)
    if result.replaced:
        how = (
            f"`git checkout HEAD -- {result.pointer} && dvc checkout {result.pointer}` brings it back" if result.replaced_in_git
            else f"put `md5: {result.replaced}` back in {result.pointer} and run `dvc checkout {result.pointer}` to bring it back"
        )
        console.print(f"  replaced version {result.replaced}: it stays in the DVC cache and remote; {how}", highlight=False)
    if result.changed and not result.committed:  # back to the version HEAD records: the pointer is as committed
        console.print(f"  record it in git: git add {result.pointer} && git commit", highlight=False)
    announced = _announcement_record(cfg, name)
    if result.changed:  # the record names a version only once its announcement completed: after a revert it may name this one
        announced.unlink(missing_ok=True)
    if result.changed or _announced_md5(announced) != result.md5:
        if not result.changed:  # a Ctrl-C, a kill or an unreachable server after the version was recorded
            console.print("  same content as the recorded version, with no record here that it was announced (drift, "
                          "retrain trigger; an ingest stopped after recording it, or another clone's): announcing it now", highlight=False)
        _announce_new_data(cfg, name, result.md5)
        announced.parent.mkdir(parents=True, exist_ok=True)
        announced.write_text(json.dumps({"md5": result.md5}) + "\n")
    else:
        console.print("  same content as the recorded version: no retrain triggered")


def _announcement_record(cfg, name: str) -> Path:
    """Where `data ingest` records the last version of `name` whose announcement completed: a version
    recorded by an ingest stopped before it (drift measured, event emitted) is announced by the next
    ingest of the same content instead of never."""
    return Path(cfg.work_dir) / "ingest" / name / "announced.json"


def _announced_md5(record: Path) -> str | None:
    try:
        return json.loads(record.read_text()).get("md5")
    except (OSError, ValueError, AttributeError):
        return None


@app.command("run")
def run(
    source: Annotated[Optional[str], typer.Option("--source", help="labelled source domain")] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="unlabelled target domain")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="adaptation method")] = None,
    profile: ProfileOpt = None,
    overrides: SetOpt = None,
    device: DeviceOpt = None,
    nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, help="training processes under torchrun (train.nproc); the global batch stays train.batch_size")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Run the pipeline flow: validate, version, pretrain (cached), adapt, evaluate, register."""
    from udaflow.preflight import check_device, validate_run

    cfg = _load(params, profile, overrides, trains=True, **{"source": source, "target": target, "method": method, "train.device": device, "train.nproc": nproc})
    validate_run(cfg)  # before anything is validated, versioned or trained (the oracle included: it is never registered)
    check_device(cfg)
    _require_loadable_champion(cfg)
    _say_input(cfg)
    _quiet_prefect()
    from flows.pipeline import adaptation_pipeline

    t0 = time.perf_counter()
    result = adaptation_pipeline(cfg, str(params))
    result["wall_seconds"] = time.perf_counter() - t0
    apart = _apart_from_project(cfg)
    if apart == []:
        _record_pipeline_outputs()
    elif apart:
        keys = ", ".join(apart[:3]) + (f" and {len(apart) - 3} more" if len(apart) > 3 else "")
        console.print(f"dvc: dvc.lock not updated: this run's settings are not params.yaml's ({keys}); "
                      "dvc.yaml's stages describe params.yaml's own", highlight=False, markup=False, soft_wrap=True)
    from udaflow import tracking

    # the version's aliases now, after its gate: another run sharing the store may have moved either since
    result["aliases"] = sorted(a for a, v in tracking.model_aliases(result["model"]).items() if str(v) == str(result["version"]))
    _print_run_summary(cfg, result)


def _require_loadable_champion(cfg) -> None:
    """Before training: the gate at the end compares the new version with the champion, so a champion whose
    files are gone fails the run there, after the training; say so now. No store or no champion: nothing to check."""
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return
    from udaflow import tracking

    tracking.configure(uri, Path(cfg.tracking.artifact_root))
    tracking.check_champion(tracking.model_name(cfg.source, cfg.target))


def _say_input(cfg) -> None:
    """One line when the backbone's timm config, not params.yaml, decides the input."""
    from udaflow.experiment import image_spec

    spec = image_spec(cfg)
    if spec.crop_pct is not None:
        unused = f"; data.image_size {cfg.data.image_size} not used" if cfg.data.image_size != spec.size else ""
        console.print(f"input: {spec.size} px ({spec.describe()}), mean {spec.mean}, std {spec.std}, from {spec.origin}{unused}")


class _BelowCritical(logging.Filter):
    """Drops every record below CRITICAL: the CLI reports a failure itself (one line, or the bug's traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL


_QUIET = _BelowCritical()


class _BelowWarning(logging.Filter):
    """Drops INFO and DEBUG: MLflow's `mlflow.pyfunc` printed a timestamped 'INFO mlflow.pyfunc: Validating input
    example against model signature' in the middle of every run's plain progress lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _STATE["debug"]


# a filter on the logger that writes the line (not its parent: a parent's filters skip its children's records);
# MLflow sets its loggers' levels and handlers on import, not their filters
logging.getLogger("mlflow.pyfunc").addFilter(_BelowWarning())


def _quiet_prefect() -> None:
    """Prefect logs a failed flow's traceback; the CLI prints one line instead (unless --debug).

    A filter, not a logger level: Prefect's ephemeral server re-applies its logging config (levels)
    when it starts, after this runs, but leaves filters alone."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    if not _STATE["debug"]:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        import prefect  # noqa: F401 - configures its loggers first, then we quieten them

        for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).addFilter(_QUIET)  # adding it twice keeps one
    _prefect_server()


_SERVER: list = []  # the temporary Prefect server this process started, if any


def _prefect_server() -> None:
    """The Prefect API the flows report to when PREFECT_API_URL names none: Prefect's temporary server,
    started here as Prefect starts it itself (its app under uvicorn, no UI), but in a session of its own
    and tied to this process. A terminal's Ctrl-C then stops the run, which reports its flow run
    crashed to a server still there (Prefect's own, in the run's process group, died with it and left
    the run retrying a closed port for a minute, then a ConnectError traceback); the kernel ends the
    server when udaflow dies, `kill -9` included (Prefect's outlived it); atexit stops it otherwise."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if PREFECT_API_URL.value() or _SERVER:  # a server named by the environment, a Prefect profile or a test harness
        return
    import atexit
    import socket
    import subprocess

    import httpx
    import prefect

    from udaflow.distributed import die_with_parent

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}  # Prefect's own for it
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory", "prefect.server.api.server:create_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, start_new_session=True, preexec_fn=die_with_parent,
    )

    def stop() -> None:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    atexit.register(stop)
    _SERVER.append(server)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"))
    with httpx.Client() as client:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"Prefect's temporary server exited with code {server.returncode} before it answered on {url}")
            try:
                if client.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Prefect's temporary server did not answer on {url} within the start-up timeout "
                                   "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
            time.sleep(0.1)
    from tasks import PRIVATE_API

    os.environ[PRIVATE_API] = url  # this process's own: no schedule, event or shared lock goes to it
    settings = temporary_settings(updates={PREFECT_API_URL: url})
    settings.__enter__()  # for this process's whole life, as Prefect's own
    _SERVER.append(settings)  # held: a dropped generator context would be closed, and the setting undone


def _apart_from_project(cfg) -> list[str] | None:
    """The dotted keys where `cfg` differs from the project's params.yaml (`target`, `train.adapt_steps`):
    [] when none; None when this folder has no params.yaml that loads, so no stages to record either. Read
    after training: a params.yaml broken meanwhile (a run of `--params other.yaml`) must not lose the summary.

    [] is what dvc.yaml's stages describe: they read params.yaml, whatever file --params named. (Compared
    with --params' own file, a run of another file wrote its model into dvc.lock under params.yaml's values,
    and `dvc status` called it up to date.)"""
    from udaflow.config import ConfigError, flatten, load_config

    project = Path.cwd() / "params.yaml"
    try:
        theirs = load_config(project) if project.is_file() else None
    except ConfigError:
        theirs = None
    if theirs is None:
        return None
    ours, theirs, missing = flatten(cfg.model_dump()), flatten(theirs.model_dump()), object()
    return sorted(k for k in ours.keys() | theirs.keys() if ours.get(k, missing) != theirs.get(k, missing))


def _record_pipeline_outputs() -> None:
    """Record this run's outputs as dvc.yaml's validate/pretrain/adapt/evaluate stages (same code, same params)."""
    from udaflow import versioning

    try:
        recorded = versioning.record_stages(Path.cwd(), ["validate", "pretrain", "adapt", "evaluate"])
    except versioning.VersioningError as exc:  # the model is registered already; say so, don't fail the run
        err_console.print(f"warning: {exc}", highlight=False)
        return
    if recorded:
        console.print(f"dvc: recorded {', '.join(recorded)} in dvc.lock")


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def _difference(original, reproduced, same: bool) -> str:
    """What `reproduce` compared (`same`: steps.compare_metrics' verdict on the row), written out: the two
    columns round to 2 decimals, so 97.304 against 97.296 read 97.30 twice in a table that said they differ."""
    if same:
        return "none"
    if original is None or reproduced is None:
        return "missing"
    return f"{float(reproduced) - float(original):+.4g}"


def _show(table: Table) -> None:
    """Print `table` without cutting a word. Rich's default shrinks columns to fit the console and ends a word it
    cannot fit with '…': a bench's 14 columns cut every shift and method name to 'synth:sho…'. Now each column is
    at least as wide as the longest word of its cells (a sentence still wraps between words), and the table is as
    wide as that needs: piped (a CI log, `| tee`, a file) at its natural width, on a terminal at the terminal's
    width or, when the words do not fit in it, at its natural width too (the terminal wraps the lines)."""
    from rich.cells import cell_len
    from rich.measure import Measurement

    def words(cell) -> list[str]:
        plain = cell.plain if isinstance(cell, Text) else Text.from_markup(cell).plain if isinstance(cell, str) else ""
        return plain.split()

    for column in table.columns:
        column.overflow = "fold"  # a header word longer than its column folds rather than ending in '…'
        column.min_width = max([1, *(cell_len(w) for cell in column.cells for w in words(cell))])
    needed = Measurement.get(console, console.options.update_width(100_000), table)
    fits = console.is_terminal and needed.minimum <= console.width
    console.print(table, width=console.width if fits else max(console.width, needed.maximum), crop=False)


def _share(fraction: float | None) -> str:
    """A share of the GEMM rate as a percentage: whole from 10% (51% on a 2-core CPU; 104% when the machine was
    busier while the bench measured its GEMM than while the cell trained), else two significant digits (0.027%
    for a 32 px model on a GPU whose bf16 GEMM runs at 760 TFLOP/s)."""
    if fraction is None:
        return "-"
    percent = 100 * fraction
    return f"{percent:.0f}%" if percent >= 9.95 else f"{percent:.2g}%"  # .2g wrote 104% as 1e+02%


def _model_uri(name: str, version: str, aliases: list[str]) -> str:
    """`@champion` when the version is champion, `@challenger` when it is that, else the version itself."""
    from udaflow.tracking import CHALLENGER, CHAMPION

    alias = next((a for a in (CHAMPION, CHALLENGER) if a in aliases), None)
    return f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"


def _print_run_summary(cfg, r: dict) -> None:
    m = r["metrics"]
    table = Table(title=f"{cfg.source} -> {cfg.target} with {cfg.method}")
    table.add_column("", style="bold")
    table.add_column("value", justify="right")
    table.add_row("MLflow run id", r["run_id"])
    aliases = r.get("aliases", [r["alias"]])  # read from the registry after the gate: champion too when it promoted this version
    table.add_row("model version", " ".join([f"{r['model']} v{r['version']}", *(f"@{a}" for a in aliases)]))
    if r.get("adopted_from_run"):  # a run killed between registration and its gate registered these weights
        table.add_row("registered by", Text(f"run {r['adopted_from_run']} (killed before its gate; the same weights: no copy registered)", justify="left"))
    table.add_row("source model", "reused (cached Prefect task)" if r["prefect_task_cached"] else ("reused cached checkpoint" if r["source_cached"] else "trained"))
    table.add_row(f"target_acc_selected (registered: {m['selected_by']} pick, step {m['selected_step']})", _fmt(m.get("target_acc_selected")))
    table.add_row("target_acc_last (last iterate)", _fmt(m.get("target_acc_last")))
    table.add_row("source_only_target_acc", _fmt(m.get("source_only_target_acc")))
    table.add_row("source_val_acc_selected", _fmt(m.get("source_val_acc_selected")))
    for name, value in m["validators_selected"].items():
        table.add_row(f"validator_selected.{name}", _fmt(value))
    table.add_row("proxy A-distance before -> after", f"{m['shift']['pad_before']:.2f} -> {m['shift']['pad_after']:.2f}")
    for stage, sec in r["stage_seconds"].items():
        table.add_row(f"seconds: {stage}", f"{sec:.1f}")
    table.add_row("seconds: total", f"{r['wall_seconds']:.1f}")
    gate = r.get("gate")
    if gate:
        # sentences left-aligned in the right-aligned column: wrapped, a right-aligned sentence's lines started anywhere
        table.add_row("promotion gate", Text(("promoted to champion: " if gate["promoted"] else "champion unchanged: ") + gate["reason"], justify="left"))
        table.add_row("gate decided on", Text(gate.get("data", "-"), justify="left"))
    _show(table)
    # the registry is params.yaml's store, not MLflow's default (./mlflow.db, or ./mlruns): without the URI the call finds no model.
    # A SQLite path absolute, so the line works from any folder; a server's without credentials (logs keep this line)
    from udaflow.tracking import redacted

    uri = cfg.tracking.uri
    uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}" if uri.startswith("sqlite:///") else redacted({"tracking": {"uri": uri}})["tracking"]["uri"]
    console.print(f"load it: mlflow.set_tracking_uri('{uri}'); mlflow.pyfunc.load_model('{_model_uri(r['model'], r['version'], aliases)}') "
                  "(safetensors weights, nothing unpickled)", highlight=False, soft_wrap=True)


class BadCron(ValueError):
    """A --cron (or --pool) Prefect cannot schedule: its own hint, not the server's (the server is up)."""

    def __init__(self, message: str, hint: str = 'cron has five fields: minute hour day month weekday, e.g. "0 3 * * *" (03:00 every day)'):
        super().__init__(message)
        self.hint = hint


def _next_cron_run(cron: str):
    """The first time `cron` fires from now, in UTC, as the Prefect server's scheduler computes it. A
    cron no date matches (30 February) is refused: Prefect accepts it and its scheduler then fails on
    it at every pass, and no retrain ever runs."""
    import asyncio

    from prefect.server.schemas.schedules import CronSchedule

    try:
        return asyncio.run(CronSchedule(cron=cron).get_dates(n=1))[0]
    except (ImportError, RuntimeError):  # a missing module, a running event loop: not the cron's fault
        raise
    except Exception:  # noqa: BLE001 - the scheduler's croniter: CroniterBadDateError, or no date among its candidates
        raise BadCron(f"--cron {cron!r} never fires: no date matches it",
                      "a day the month never has (30 or 31 February, 31 April, ...)? the day and month fields are the 3rd and 4th") from None


@app.command("schedule")
def schedule(
    source: Annotated[str, typer.Option("--source", help="labelled source domain")],
    target: Annotated[str, typer.Option("--target", help="unlabelled target domain")],
    cron: Annotated[str, typer.Option("--cron", help='cron expression, e.g. "0 3 * * *"')],
    method: Annotated[Optional[str], typer.Option("--method", help="adaptation method (default: params.yaml)")] = None,
    profile: ProfileOpt = "quick",
    pool: Annotated[str, typer.Option("--pool", help="Prefect work pool (process type; created if missing)")] = "udaflow",
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Deploy the retrain flow on a running Prefect server: cron schedule + retrain on new target data."""
    from tasks import named_prefect_api

    if named_prefect_api() is None:  # the environment's or the Prefect profile's (`prefect config set PREFECT_API_URL=...`)
        raise RuntimeError("no Prefect server: PREFECT_API_URL is set neither in the environment nor in the Prefect profile, "
                           "and a schedule lives on a server (udaflow run's temporary one ends with the run)")
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise BadCron(f"--cron {cron!r} is not a valid cron expression") from None
    if not cron.strip().startswith("@") and len(cron.split()) != 5:  # Prefect reads a sixth field as seconds: 60 retrains a night
        raise BadCron(f"--cron {cron!r} has {len(cron.split())} fields, not five (minute hour day month weekday; "
                         "Prefect would read a sixth as seconds)")
    from prefect.client.schemas.actions import WorkPoolCreate

    try:  # Prefect's own rule, checked before anything is deployed: it came as a pydantic traceback from the deploy
        WorkPoolCreate(name=pool, type="process")
    except ValueError as exc:
        problem = exc.errors()[0]["msg"].removeprefix("Value error, ") if hasattr(exc, "errors") else str(exc)
        raise BadCron(f"--pool {pool!r}: not a work pool name ({problem})",
                      "a Prefect work pool name: not empty, without '/', '%', '&', '<' or '>'") from None
    next_run = _next_cron_run(cron)
    cfg = _load(params, profile, None, trains=True, **{"source": source, "target": target, "method": method})
    from udaflow.preflight import validate_run

    validate_run(cfg)  # a retrain at 3 a.m. must not be the first to find a bad setting
    from flows.schedule import deploy_retrain

    deployment_id = deploy_retrain(params, source, target, cron, method, profile, pool)
    console.print(f"deployment udaflow-retrain/{source}-to-{target} ({deployment_id}): cron {cron!r}, and on new '{target}' data")
    console.print(f"next scheduled retrain: {next_run:%Y-%m-%d %H:%M} UTC")
    console.print(f"run it with a worker: prefect worker start --pool {pool}")


ModelOpt = Annotated[str, typer.Option("--model", help="registered model, e.g. udaflow-synth-to-mnist")]


def _lookup_store(cfg, missing: str) -> None:
    """Point udaflow.tracking at params.yaml's store for a lookup. A SQLite store that is not there
    holds nothing: `missing` is the error, and no empty store is created by asking."""
    from udaflow import tracking

    _require_store(cfg.tracking.uri, f"{missing}: ")
    tracking.configure(cfg.tracking.uri, Path(cfg.tracking.artifact_root))


def _require_store(uri: str, prefix: str = "") -> None:
    """Refuse a SQLite store that is not there (MLflow would make an empty one and show or search it)."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise NotFound(f"{prefix}no MLflow store at {uri.removeprefix('sqlite:///')} (tracking.uri {uri})",
                       "run udaflow in the project folder, where `udaflow run` made the store (or fix tracking.uri in params.yaml)")


def _require_model(cfg, name: str) -> None:
    """Fail before any flow starts when no registered model `name` exists (Prefect would log the crash)."""
    from udaflow import tracking

    where = f"registered model '{name}' does not exist"
    hint = "models are named udaflow-<source>-to-<target> (`udaflow run` registers them); list them with `udaflow ui`"
    if not re.fullmatch(r"[\w.-]+", name):
        raise NotFound(f"{where}: '{name}' is not a model name", hint)
    _lookup_store(cfg, where)
    if not tracking.latest_versions(name):
        raise NotFound(f"{where} in {cfg.tracking.uri}", hint)


def _require_run(cfg, run_id: str, device: str | None = None):
    """Fail before any flow starts when `run_id` is not a `udaflow run` in the store (or lacks its record),
    or when the device it would re-run on (`device`, else its own train.device) is not on this machine."""
    from udaflow import tracking

    _lookup_store(cfg, f"MLflow run '{run_id}' does not exist")
    record = tracking.run_record(run_id)  # LookupError naming what is missing; the flow reads it again
    from pydantic import ValidationError

    from udaflow.config import Config, ConfigError, explain
    from udaflow.engine import resolve_device
    from udaflow.steps import rerun_config

    try:  # before a dataset is restored: the recorded params must still be ones this udaflow reads
        rerun = rerun_config(record.config, device)
        try:
            resolve_device(rerun.train.device)
        except RuntimeError as exc:  # a GPU this machine lacks: the run ids hint of `reproduce`'s other errors is beside the point
            flag = "--device" if device else f"the run's own train.device ({rerun.train.device})"
            raise ConfigError(f"{exc}", hint=f"{flag} names a GPU this machine does not have: re-run on the CPU with "
                                             f"`udaflow reproduce {run_id} --device cpu` (the metrics then may differ: other "
                                             "kernels), or on a machine with the GPU") from None
    except ValidationError as err:
        commit = record.tags.get("git.commit", "unknown")
        raise ConfigError(f"run '{run_id}' was made with params this udaflow no longer reads: {explain(err, model=Config)}",
                          hint=f"reproduce it with the code it ran: `git checkout {commit[:12]}`, `make setup`, then "
                               f"`udaflow reproduce {run_id}`") from None
    weights, recorded = rerun.model.pretrained, record.tags.get(tracking.PRETRAINED_TAG)
    if weights and weights != "timm":  # the run started from a local file: the same bytes, or the re-run trains another model
        from udaflow.models.backbone import weights_digest

        put_back = "put back the file that run started from (its sha256 is the run's udaflow.pretrained_sha256 tag)"
        if not Path(weights).is_file():
            raise ConfigError(f"run '{run_id}' started from the weights file {weights} (model.pretrained), which is not there", hint=put_back)
        if recorded and (now := weights_digest(weights)) != recorded:
            raise ConfigError(f"run '{run_id}' started from other weights than {weights} holds now (model.pretrained: sha256 "
                              f"{recorded[:12]} then, {now[:12]} now)", hint=put_back)
    return record


def _warn_other_code(run_id: str, then: str | None) -> None:
    """Before a re-run: say when this checkout's code is not the code the run was made with. Commits that only
    moved data pointers, params or docs are the same code (as `git.dirty` counts it): a probe's reproduce after
    two ingests warned of another commit, after training, with identical metrics."""
    from udaflow import tracking

    now = tracking.git_state().get("git.commit")
    if not then or then == now:
        return
    changed = tracking.code_changes_since(then) if then != "unknown" else None
    if changed is None:
        err_console.print(f"warning: run {run_id} was made at commit {then}, which this checkout ({now}) does not hold: its code "
                          "may differ", highlight=False, soft_wrap=True)
    elif changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        err_console.print(f"warning: run {run_id} was made at commit {then[:12]}; this checkout ({now[:12]}) differs from it in "
                          f"{len(changed)} code file(s): {shown}", highlight=False, soft_wrap=True)


@app.command("promote")
def promote(
    model: ModelOpt,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the comparison and decision; change nothing")] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Promotion gate: measure `champion` and `challenger` now on the same data and move `champion` if the challenger is at least as good.

    The data: the label-free validator on the target's current unlabelled pool (or accuracy on
    the target's labelled `val` split when it has one; never `test`) and source val accuracy. A
    collapsed challenger is refused; a first version must do at least as well as its own source-only
    model (on the val split when the target has one)."""
    cfg = _load(params, None, None)
    _require_model(cfg, model)
    from udaflow import tracking

    source, target = tracking.model_shift(model)  # the gate measures on the model's own shift, whatever params.yaml names
    cfg = _load(params, None, None, flags={"source": "--model", "target": "--model"}, source=source, target=target)
    _quiet_prefect()
    from flows.promote import promote_model

    decision, challenger, champion = promote_model(cfg, model, dry_run)
    table = Table(title=f"{model}: challenger v{challenger} vs champion {'v' + champion if champion else '(none)'}")
    for col in ("metric", "champion", "challenger"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row in decision.rows:
        table.add_row(*row)
    if decision.rows:  # none when nothing was measured (the challenger is the champion already, or was rolled back)
        _show(table)
        console.print(f"decided on: {decision.data}", markup=False, highlight=False)  # domain names, not markup
    from udaflow import tracking

    incomplete = tracking.incomplete_versions(model)
    if incomplete:
        console.print(f"incomplete: v{', v'.join(incomplete)} (registration cut short; never aliased)")
    verb = "would promote" if dry_run and decision.promote else "promoted" if decision.promote else "not promoted"
    console.print(f"{'[dry run] ' if dry_run else ''}{verb}: {decision.reason}", markup=False, highlight=False)  # rich read "[dry run]" as a style


@app.command("rollback")
def rollback(
    model: ModelOpt,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the versions the champion would move between; change nothing")] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Move `champion` back to the previous champion version."""
    cfg = _load(params, None, None)
    _require_model(cfg, model)
    _quiet_prefect()
    from flows.promote import rollback_model

    current, previous = rollback_model(cfg, model, dry_run)
    verb = "[dry run] would roll back" if dry_run else "rolled back"  # markup=False: rich read "[dry run]" as a style
    console.print(f"{model}: champion {verb} from v{current} to v{previous}", markup=False, highlight=False)


@app.command("reproduce")
def reproduce(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a `udaflow run`")],
    device: Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N (default: the run's own train.device)")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Restore a run's datasets from DVC into runs/reproduce/RUN_ID, re-run it, compare metrics (exit 1 if they differ)."""
    from udaflow import tracking, versioning

    cfg = _load(params, None, None, **{"train.device": device})  # a device string udaflow reads
    record = _require_run(cfg, run_id, device)
    _warn_other_code(run_id, record.tags.get("git.commit"))
    project = versioning.find_root(Path(cfg.data.root)) or Path.cwd()
    _quiet_prefect()
    from flows.reproduce import reproduce_run

    workspace = Path(cfg.work_dir) / "reproduce" / run_id
    result = reproduce_run(run_id, cfg.tracking.uri, str(cfg.tracking.artifact_root), str(project), str(workspace), device)
    state = tracking.git_state()  # the code's commit and dirty flag, as `udaflow run` records them
    for whose, dirty in ((f"run {run_id} was made from", result["tags"].get("git.dirty")), ("this re-run is made from", state.get("git.dirty"))):
        if dirty == "true":  # code the commit does not hold: the same commit is not the same code
            err_console.print(f"warning: {whose} a checkout with uncommitted code changes (git.dirty); the commit alone does not say "
                              "what trained", highlight=False)
    from udaflow import costs
    from udaflow.engine import resolve_device
    from udaflow.steps import machine_differences

    here = {**costs.machine(resolve_device(result["device"])), "version.torch": tracking.package_versions()["version.torch"]}
    machines = machine_differences(result["tags"], here)
    if machines:
        err_console.print(f"warning: run {run_id} was trained on other hardware or torch ({'; '.join(machines)}): deterministic "
                          "training repeats its bits only on the same CPU model (MKL and oneDNN pick kernels, and so the order "
                          "of floating-point sums, by CPU), GPU and torch build", highlight=False)
    table = Table(title=f"reproduce {run_id} (workspace {result['workspace']})")
    for col in ("metric", "original", "reproduced", "difference"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, a, b, same in result["rows"]:
        table.add_row(key, _fmt(a), _fmt(b), _difference(a, b, same))
    _show(table)
    if not result["same"]:
        console.print("[bold red]reproduced metrics differ from the recorded ones[/]"
                      + (" (expected on other hardware or torch: see the warning above)" if machines else ""))
        raise typer.Exit(code=1)
    console.print("reproduced: identical metrics")


stage_app = typer.Typer(help="One pipeline step, as dvc.yaml's stages call it (`dvc repro`).", no_args_is_help=True, hidden=True)
app.add_typer(stage_app, name="stage")


def _stage_config(params: Path):
    """params.yaml, checked as `udaflow run` checks it: `dvc repro` runs a stage alone when the ones before it
    did not change (adapt after a new `method`), so every stage gives the same errors the first one does."""
    from udaflow.preflight import validate_run

    cfg = _load(params, None, None)
    validate_run(cfg)
    return cfg


@stage_app.command("validate")
def stage_validate(params: ParamsOpt = Path("params.yaml")) -> None:
    """Great Expectations suites on the source and target."""
    from udaflow import steps
    from udaflow.data.manifest import DataError
    from udaflow.preflight import check_device

    cfg = _stage_config(params)
    check_device(cfg)
    with steps.domains_in_use(cfg):  # each stage, as a pipeline run: a `--replace` waits for it
        report = steps.validate_datasets(cfg)
    if not report.success:
        raise DataError(report.error(), report.hint())
    console.print(f"validated: {report.statistics}")


@stage_app.command("pretrain")
def stage_pretrain(params: ParamsOpt = Path("params.yaml")) -> None:
    """Source pretraining (reuses the on-disk cache)."""
    from udaflow import steps

    cfg = _stage_config(params)
    with steps.domains_in_use(cfg):
        outcome = steps.pretrain(cfg)
    # the stage's output, dvc.yaml's; the cache it was trained into (or read from) is keyed on source and settings
    console.print(f"source model: {steps.run_paths(cfg).source_model} ({'read from' if outcome.cached else 'trained into'} "
                  f"the cache {outcome.path})", highlight=False)


@stage_app.command("adapt")
def stage_adapt(params: ParamsOpt = Path("params.yaml")) -> None:
    """Adaptation with params.yaml's method."""
    from udaflow import steps

    cfg = _stage_config(params)
    with steps.domains_in_use(cfg):
        outcome = steps.adapt(cfg)
    steps.drop_checkpoint(cfg)  # model.pt is the stage's output: nothing left to resume
    console.print(f"adapted model: {outcome.path}")


@stage_app.command("evaluate")
def stage_evaluate(params: ParamsOpt = Path("params.yaml")) -> None:
    """Metrics and figures of the adapted model."""
    from udaflow import steps

    cfg = _stage_config(params)
    with steps.domains_in_use(cfg):
        metrics = steps.evaluate(cfg)
    console.print(f"target_acc_selected {_fmt(metrics.get('target_acc_selected'))}, target_acc_last {_fmt(metrics.get('target_acc_last'))} -> {steps.run_paths(cfg).metrics}")


@app.command("serve")
def serve(
    model: ModelOpt,
    alias: Annotated[str, typer.Option("--alias", help="registry alias (or a version number)")] = "champion",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 5001,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    workers: Annotated[int, typer.Option("--workers", min=1)] = 1,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Serve a registered model over HTTP with `mlflow models serve` (POST /invocations).

    The body: {"inputs": [{"image": "<base64 PNG/JPEG>"}, {"image": <uint8 pixels: H rows of W \\[r, g, b]>}]};
    the answer: {"predictions": [{"class": ..., "probabilities": {class: p}}]}. A bad image gets a 400."""
    cfg = _load(params, None, None)
    _require_model(cfg, model)
    from udaflow import tracking

    versions, aliases = [str(v.version) for v in tracking.latest_versions(model)], tracking.model_aliases(model)
    if (str(int(alias)) not in versions) if alias.isdigit() else (alias not in aliases):  # before MLflow's scoring server fails with a traceback
        named = ", ".join(f"@{a} (v{v})" for a, v in sorted(aliases.items())) or "none"
        raise NotFound(f"registered model '{model}' has no {'version ' + alias if alias.isdigit() else 'alias @' + alias} "
                       f"(its versions: {', '.join(versions)}; its aliases: {named})",
                       "`udaflow promote` makes a challenger the champion once it passes the gate; "
                       "`--alias challenger` or `--alias N` serves another version")
    uri = f"models:/{model}/{alias}" if alias.isdigit() else f"models:/{model}@{alias}"
    _require_port(host, port)
    version = str(int(alias)) if alias.isdigit() else aliases[alias]
    # MLflow's scoring server would load it after execve and end in a traceback when its files are gone
    tracking.check_loadable(model, version, f"v{version}" if alias.isdigit() else f"@{alias} (v{version})")
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        # MLflow starts its scoring server as `uvicorn` from PATH: this environment's, from any shell
        "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")]),
        "MLFLOW_TRACKING_URI": cfg.tracking.uri,
    }
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
           "--host", host, "--port", str(port), "--workers", str(workers)]
    console.print(f"serving {uri} on http://{host}:{port}/invocations (Ctrl-C stops it)", highlight=False)
    sys.stdout.flush()
    os.execve(sys.executable, cmd, env)


def _require_port(host: str, port: int) -> None:
    """Fail here when the server could not listen on host:port: after `execve`, MLflow loads the model
    for a minute, then uvicorn's "address already in use" ends in MLflow's traceback."""
    import errno
    import socket

    try:
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):  # `::`, `::1` too
            pass
    except OSError as exc:
        # create_server re-raises bind's error as "<strerror> (while attempting to bind on address ...)"
        why = str(exc.strerror or exc).split(" (while attempting", 1)[0]
        err = RuntimeError(f"cannot listen on {host}:{port}: {why}")
        if exc.errno == errno.EADDRINUSE:
            err.hint = "another server holds that port (`ss -ltnp` names it): pass a free one with --port, or stop it"
        elif isinstance(exc, socket.gaierror) or (exc.errno or 0) < 0 or exc.errno == errno.EADDRNOTAVAIL:  # getaddrinfo's codes are negative
            # a typo'd or foreign address (999.1.1.1, another machine's IP, a name DNS does not know): not the port's fault
            err.hint = "--host must be an address of this machine (`ip -brief address` lists them): 127.0.0.1 for this machine only, 0.0.0.0 for every interface"
        elif exc.errno == errno.EACCES:
            err.hint = "ports below 1024 need root: pass one above with --port"
        else:
            err.hint = "pass another --host or --port"
        raise err from None


@app.command("ui")
def ui(
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 5000,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Start the MLflow UI on 127.0.0.1 for the local store (a tracking server serves its own)."""
    cfg = _load(params, None, None)
    # the ML (training runs) layout: MLflow 3.17's UI picks GenAI or ML from a sidebar switch that
    # defaults to GenAI; this query parameter sets it (the experiments also carry the kind tag)
    view = "#/experiments?workflowType=machine_learning"
    from udaflow.tracking import is_server

    if is_server(cfg.tracking.uri):
        console.print(f"the tracking server serves the UI: {cfg.tracking.uri.rstrip('/')}/{view}")
        return
    _require_store(cfg.tracking.uri)
    _require_port("127.0.0.1", port)  # else the URL printed below is another server's, and MLflow exits 0
    cmd = [
        sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", cfg.tracking.uri,
        "--default-artifact-root", str(Path(cfg.tracking.artifact_root).resolve()), "--host", "127.0.0.1", "--port", str(port),
    ]
    console.print(f"MLflow UI on http://127.0.0.1:{port}/{view} (Ctrl-C stops it)")
    os.execv(sys.executable, cmd)


@app.command("bench")
def bench(
    shifts: Annotated[str, typer.Option("--shifts", help="SOURCE:TARGET[,SOURCE:TARGET...]")] = "synth:mnist,mnist:mnistm",
    methods: Annotated[str, typer.Option("--methods", help="comma-separated method names")] = "source_only,oracle,dann,cdan,mcc,cdtrans,adamatch,ssrt",
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="seeds per (shift, method)")] = 1,
    profile: ProfileOpt = "quick",
    protocol: Annotated[Optional[str], typer.Option("--protocol", help="transductive | holdout (default: params.yaml's bench.protocol)")] = None,
    out: Annotated[Path, typer.Option("--out", help="JSON rows are written here")] = Path("bench.json"),
    overrides: SetOpt = None,
    device: DeviceOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="cells run at once, each in its own process with cores / jobs threads (or train.num_threads)")] = 1,
) -> None:
    """Benchmark methods on shifts; prints a table and writes one JSON row per (shift, method, seed)."""
    from udaflow.bench import parse_shifts, run_bench, summarise
    from udaflow.preflight import validate_run

    if protocol not in (None, "transductive", "holdout"):
        raise ValueError(f"--protocol {protocol!r}: use transductive or holdout")
    cfg = _load(params, profile, overrides, trains=True, **{"train.device": device})
    protocol = protocol or cfg.bench.protocol  # until 2026-12-03 the option's own default won over params.yaml
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    if not method_list:
        raise ValueError(f"--methods {methods!r}: no method named (e.g. --methods source_only,adamatch)")
    shift_list = parse_shifts(shifts)
    for option, items in (("--methods", method_list), ("--shifts", [f"{s}:{t}" for s, t in shift_list])):
        twice = sorted({i for i in items if items.count(i) > 1})
        if twice:  # each copy trained, then the rows repeated the last one and the validator study counted it N times
            raise ValueError(f"{option}: {', '.join(repr(i) for i in twice)} given twice")
    from udaflow import steps

    steps.recover_ingests(cfg, [d for s, t in shift_list for d in (s, t)])  # an ingest killed outright: its folder put back first
    validate_run(cfg, methods=method_list, domains=[(f"--shifts {s}:{t}", d) for s, t in shift_list for d in (s, t)])
    t0 = time.perf_counter()

    def show(row):
        console.print(
            f"{row['shift']:>14} {row['method']:>12} seed {row['seed']}: target_acc_last {_fmt(row.get('target_acc_last'))} "
            f"(selected {_fmt(row.get('target_acc_selected'))}), source_val_acc_last {_fmt(row['source_val_acc_last'])}, "
            f"{row['seconds']:.0f}s, {row['train_images_per_s']:.0f} img/s, {row['achieved_gflops']:.0f} GFLOP/s "
            + ("(a cached source model: an earlier training's speed)" if row.get("cached_pretraining") else
               f"({_share(row.get('matmul_fraction'))} of matmul)")
        )

    def machine(gflops: float, threads: int) -> None:
        from udaflow.costs import cpu_name, gemm_name, training_matmul
        from udaflow.engine import resolve_device

        gpu, dtype = training_matmul(resolve_device(cfg.train.device), cfg.train.amp)
        rate = (f"{gemm_name(gpu, dtype)} matmul (8192^2) {gflops:.0f} GFLOP/s"
                if gpu.type == "cuda" else f"fp32 matmul (2048^2) {gflops:.0f} GFLOP/s on {threads} threads")
        console.print(f"machine: {cpu_name()}, {rate}; speeds below are shares of it", highlight=False)

    # every shift's domains held for the whole bench, as a run holds its own: a `--replace` of one waits for it
    with steps.domains_in_use(cfg, [d for s, t in shift_list for d in (s, t)]), _terminated_as_interrupted():
        rows = run_bench(
            cfg, shift_list, method_list, seeds, protocol, out, on_row=show, on_correlations=_print_correlations, on_machine=machine,
            jobs=jobs,
        )
    _print_bench_table(rows)
    if seeds > 1:
        _print_seed_summary(summarise(rows))
    console.print(f"{len(rows)} rows -> {out} ({time.perf_counter() - t0:.0f}s in all)")


def _print_correlations(correlations: dict) -> None:
    regrets = sorted({n for c in correlations.values() for n in c.get("regret", {})})
    if regrets:
        table = Table(title="validators: regret = best-by-target minus the pick, mean over the shift's runs (reported, never used)")
        table.add_column("shift")
        for n in regrets:
            table.add_column(n, justify="right")
        for shift, c in correlations.items():
            table.add_row(shift, *[_fmt(c.get("regret", {}).get(n)) for n in regrets])
        _show(table)
    names = sorted({n for c in correlations.values() for n in c.get("spearman", {})})
    table = Table(title="validators: Spearman correlation with target accuracy (all checkpoints, all methods)")
    table.add_column("shift")
    table.add_column("checkpoints", justify="right")
    for n in names:
        table.add_column(n, justify="right")
    for shift, c in correlations.items():
        table.add_row(shift, str(c.get("checkpoints", 0)), *[_fmt(c.get("spearman", {}).get(n)) for n in names])
    _show(table)


def _print_bench_table(rows: list[dict]) -> None:
    table = Table(title="udaflow bench")
    for col in (  # the JSON's names with spaces: a narrow column wraps a header between words
        "shift", "method", "seed", "target acc last", "target acc selected", "selected by", "selection loss", "median last 5",
        "source val acc last", "seconds", "img/s", "GFLOP/s", "of matmul", "device",
    ):
        table.add_column(col, justify="right" if col not in ("shift", "method", "selected by") else "left")
    for r in rows:
        table.add_row(
            r["shift"], r["method"], str(r["seed"]), _fmt(r.get("target_acc_last")), _fmt(r.get("target_acc_selected")),
            r["selected_by"], _fmt(r.get("selection_loss")), _fmt(r.get("median_last5_target_acc")), _fmt(r["source_val_acc_last"]),
            _fmt(r["seconds"]), _fmt(r["train_images_per_s"]), _fmt(r.get("achieved_gflops")), _share(r.get("matmul_fraction")), r["device"],
        )
    _show(table)


def _print_seed_summary(cells: list[dict]) -> None:
    from udaflow.bench import SUMMARY_KEYS

    table = Table(title="udaflow bench: mean ± std over seeds")
    for col in ("shift", "method", "seeds", *(k.replace("_", " ") for k in SUMMARY_KEYS)):
        table.add_column(col, justify="left" if col in ("shift", "method") else "right")
    for c in cells:
        values = [f"{c[k]['mean']:.2f} ± {c[k]['std']:.2f}" if k in c else "-" for k in SUMMARY_KEYS]
        table.add_row(c["shift"], c["method"], str(c["seeds"]), *values)
    _show(table)


def main() -> None:
    setup_environment()
    app()


if __name__ == "__main__":
    main()
