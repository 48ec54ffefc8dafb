"""DVC: version a dataset, read its content hash, restore a past version. The one place DVC is used.

A domain folder data/raw/<name> is tracked either as the output of a `dvc.yaml` stage (the
built-in domains: `build@synth`, ... are reproducible from code, so `dvc repro` rebuilds them) or
by a `data/raw/<name>.dvc` file (user folders from `udaflow data ingest`). `version_dataset`
handles both: it commits the new content to the DVC cache, records its hash in git's pointer file
(`dvc.lock` or `<name>.dvc`) and pushes it to the default remote. The hash is the dataset's
identity everywhere else (MLflow dataset digests, cache keys, reproduction).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_REMOTE = "local"


class VersioningError(RuntimeError):
    """DVC could not record or restore a dataset; the message names the path, `hint` what to do."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class DatasetVersion:
    name: str
    path: str  # relative to the DVC root
    md5: str  # DVC content hash of the folder (`<md5>.dir`)
    pointer: str  # the git-tracked file that records it: dvc.lock or <name>.dvc
    changed: bool  # True when this call stored new content


def inside_dvc_stage() -> bool:
    """`dvc repro` is running us: it records the stage's outputs itself (and holds the repo lock)."""
    return bool(os.environ.get("DVC_STAGE"))


def find_root(start: Path) -> Path | None:
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def _locate(path: Path, root: Path | None) -> tuple[Path, Path | None]:
    """`path` resolved, and the DVC project it is in (`root` when given)."""
    path = Path(path).resolve()
    return path, (Path(root).resolve() if root else find_root(path))


@contextmanager
def _repo(root: Path):
    from dvc.repo import Repo

    logging.getLogger("dvc").setLevel(logging.WARNING)
    repo = Repo(str(root))
    try:
        yield repo
    finally:
        repo.close()


def init_repo(root: Path, remote_url: str = "dvc-remote") -> Path:
    """`dvc init` (in a git repo) plus a default local remote, unless already set up."""
    from dvc.repo import Repo

    root = Path(root).resolve()
    if not (root / ".dvc").is_dir():
        Repo.init(str(root), no_scm=not (root / ".git").exists())
    config = root / ".dvc" / "config"
    text = config.read_text() if config.exists() else ""
    if "[core]" not in text and "['remote" not in text:
        # relative to .dvc/, as DVC reads it, so a clone of the project finds its remote in place
        url = remote_url if os.path.isabs(remote_url) else os.path.relpath(root / remote_url, root / ".dvc")
        config.write_text(text + f"[core]\n    remote = {DEFAULT_REMOTE}\n['remote \"{DEFAULT_REMOTE}\"']\n    url = {url}\n")
    return root


def _find_out(repo, path: Path):
    """The output tracking `path` and the stage that owns it, or (None, None)."""
    target = os.path.abspath(path)
    for stage in repo.index.stages:
        for out in stage.outs:
            if os.path.abspath(out.fs_path) == target:
                return stage, out
    return None, None


def _pointer(stage, root: Path) -> str:
    return os.path.relpath(stage.path, root).replace("dvc.yaml", "dvc.lock")


def _check_pointer_visible(repo, path: Path) -> None:
    """DVC skips git-ignored folders when it collects `.dvc` files: a pointer written there is lost.

    (A root `.gitignore` rule `/data/raw/*` matches `data/raw/` itself in that check; `/data/raw/?*`
    ignores the domain folders without hiding their pointers.)
    """
    scm = getattr(repo, "scm", None)
    folder = str(path.parent)
    if scm is None or not hasattr(scm, "is_ignored") or not scm.is_ignored(folder + os.sep):
        return
    raise VersioningError(
        f"{path.parent}: git ignores this folder, so DVC would not find the pointer {path.name}.dvc written there; "
        f"change the .gitignore rule that matches '{os.path.relpath(folder, repo.root_dir)}/' (e.g. '/data/raw/*' -> '/data/raw/?*')"
    )


def tracked_by(path: Path, root: Path | None = None) -> str | None:
    """What records `path` in DVC: 'build@mnist' (a dvc.yaml stage), 'data/raw/x.dvc' (a pointer), or None."""
    path, root = _locate(path, root)
    if root is None:
        return None
    with _repo(root) as repo:
        stage, _ = _find_out(repo, path)
        if stage is None:
            return None
        return os.path.relpath(stage.path, root) if stage.is_data_source else stage.name


def committed_in_git(pointer: str, md5: str, root: Path) -> bool:
    """Whether git's HEAD holds `pointer` (e.g. data/raw/x.dvc) recording hash `md5`: `git checkout HEAD -- pointer` restores it."""
    with _repo(root) as repo:
        try:
            return md5 in repo.scm.get_fs("HEAD").read_text(pointer)
        except Exception:  # noqa: BLE001 - no git, no commit yet, pointer never committed
            return False


def version_dataset(path: Path, root: Path | None = None, push: bool = True) -> DatasetVersion:
    """Commit `path` to the DVC cache (new content only), record its hash, push to the default remote."""
    path, root = _locate(path, root)
    if root is None:
        raise VersioningError(f"{path}: not inside a DVC project; run `dvc init` (or `make setup`) at the repository root")
    if not path.is_dir():
        raise VersioningError(f"{path}: no such dataset folder")
    try:
        with _repo(root) as repo:
            stage, out = _find_out(repo, path)
            before = out.hash_info.value if out is not None and out.hash_info else None
            if stage is not None and not stage.is_data_source:
                repo.commit(stage.addressing, force=True)
                stage, out = _find_out(repo, path)
            else:
                if stage is None:
                    _check_pointer_visible(repo, path)
                # the stage `add` returns holds the new hash; the repo's index may not list it yet
                stage, = repo.add(str(path))
                out, = stage.outs
            md5 = out.hash_info.value
            remote = repo.config.get("core", {}).get("remote")
            if push and remote:
                try:
                    repo.push(targets=[str(path)])
                except Exception as exc:  # noqa: BLE001 - unreachable, unwritable, misconfigured
                    url = repo.config.get("remote", {}).get(remote, {}).get("url", "?")
                    raise VersioningError(
                        f"{path}: could not push to the default DVC remote '{remote}' ({url}): {exc}",
                        "check the remote with `dvc remote list` (.dvc/config, .dvc/config.local)",
                    ) from exc
            return DatasetVersion(path.name, os.path.relpath(path, root), md5, _pointer(stage, root), md5 != before)
    except VersioningError:
        raise
    except Exception as exc:  # dvc raises many types; the user needs the path and the reason
        raise VersioningError(f"{path}: DVC could not version this dataset: {exc}") from exc


def _tree(folder: Path) -> set[str]:
    """Every file and folder under `folder`, relative to it."""
    found: set[str] = set()
    for here, dirs, files in os.walk(folder):
        rel = os.path.relpath(here, folder)
        found.update(os.path.normpath(os.path.join(rel, name)) for name in (*dirs, *files))
    return found


def _ingest_files(path: Path, root: Path) -> list[Path]:
    """The git-tracked files an ingest of the folder `path` may rewrite: its pointer, the .gitignore beside it, dvc.lock."""
    return [path.with_name(path.name + ".dvc"), path.parent / ".gitignore", root / "dvc.lock"]


def _aside(path: Path, what: str) -> Path:
    """`.<name>.<what>` beside the dataset folder: previous (the content being replaced), discard (the
    replaced content of a finished ingest, being deleted), ingest.json (the journal of an ingest under way)."""
    return path.with_name(f".{path.name}.{what}")


def _process_alive(host: str, pid: int) -> bool:
    """Whether process `pid` on `host` may still run (another host's process is assumed alive)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def recover_interrupted_ingest(path: Path, root: Path | None = None) -> str | None:
    """Finish what an ingest of the folder `path` that was killed outright (SIGKILL, a power cut: no
    chance to roll back) left half-done, from its journal (`.<name>.ingest.json`, written before
    anything moved); returns a line saying what was done, or None when nothing was left.

    Killed before it had finished, the ingest is rolled back: the previous folder (`.<name>.previous`)
    goes back in place, the pointer, .gitignore and dvc.lock get their saved bytes back, and the new
    copy is removed (the user's own folder, which it was copied from, is untouched). Killed after it had
    finished (the replaced folder already renamed to `.<name>.discard`), the finished version stays and
    the leftovers are deleted. DVC cache objects the killed ingest added stay; `dvc gc` removes them.
    An ingest still running (its process alive) is left alone: VersioningError.
    """
    path, root = _locate(path, root)
    journal, backup, discard = _aside(path, "ingest.json"), _aside(path, "previous"), _aside(path, "discard")
    if not journal.exists():
        if discard.exists():  # finished and its journal deleted; killed while deleting the replaced copy
            shutil.rmtree(discard, ignore_errors=True)
        if backup.exists() and path.exists():  # no journal: an ingest of an udaflow without one
            raise VersioningError(
                f"{backup}: an earlier ingest of '{path.name}' was interrupted and left the previous content there; "
                f"remove it if {path} is the version you want, else move it back to {path}"
            )
        if backup.exists():
            backup.replace(path)  # the interrupted ingest had moved the data aside and not yet put new data in
            return f"{path}: an interrupted ingest had moved it aside; put back"
        return None
    try:
        state = json.loads(journal.read_text())
        files = {Path(f): base64.b64decode(c) if c is not None else None for f, c in state["files"].items()}
        host, pid, had_previous = str(state["host"]), int(state["pid"]), bool(state["had_previous"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VersioningError(f"{journal}: the journal of an interrupted ingest of '{path.name}' cannot be read ({exc})",
                              f"compare {path} with {backup} by hand, keep the version you want, then delete {journal}") from None
    if _process_alive(host, pid):
        raise VersioningError(f"{path}: an ingest of '{path.name}' is under way (pid {pid} on {host}); wait for it to finish",
                              f"if no such process runs, delete {journal} and {backup}, keeping the version you want at {path}")
    when = state.get("started", "?")
    if discard.exists():  # it had finished: the new version stands
        journal.unlink()
        shutil.rmtree(discard, ignore_errors=True)
        return f"{path}: an ingest killed while it cleaned up (pid {pid}, started {when}) had finished; its version stays"
    if backup.exists():
        shutil.rmtree(path, ignore_errors=True)
        backup.replace(path)
    elif not had_previous:
        shutil.rmtree(path, ignore_errors=True)
    # else the previous folder never moved: `path` still holds it
    for file, content in files.items():
        if content is None:
            file.unlink(missing_ok=True)
        else:
            file.write_bytes(content)
    journal.unlink()
    return f"{path}: an ingest killed before it finished (pid {pid}, started {when}) was rolled back; the previous version is in place"


@contextmanager
def rollback_on_failure(path: Path, root: Path | None = None):
    """A new version of the dataset folder `path` goes in place inside this block, all or nothing.

    On entry the current folder (if any) moves aside to `.<name>.previous`; the block puts the new
    one at `path` and versions it. If the block raises (a failed copy, validation, `dvc add`, a
    push, Ctrl-C), everything DVC or the block touched is put back as it was: the folder, its
    `<name>.dvc` pointer, the `.gitignore` beside it, `dvc.lock`, and the DVC cache (objects the
    block added are removed). On success the moved-aside folder is deleted; its content stays in
    the DVC cache and remote under its old hash.

    A process killed outright inside the block cannot roll back: a journal written on entry
    (`.<name>.ingest.json`: the saved files, whether a previous folder existed, the pid) lets the
    next ingest of the name, or the next pipeline run reading it, do it (`recover_interrupted_ingest`).
    """
    path, root = _locate(path, root)
    if root is None:
        raise VersioningError(f"{path}: not inside a DVC project; run `dvc init` (or `make setup`) at the repository root")
    recover_interrupted_ingest(path, root)
    backup, journal, discard = _aside(path, "previous"), _aside(path, "ingest.json"), _aside(path, "discard")
    with _repo(root) as repo:
        cache = Path(repo.cache.legacy.path)
    saved = {f: f.read_bytes() if f.exists() else None for f in _ingest_files(path, root)}
    cached = _tree(cache)
    state = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "had_previous": path.exists(), "files": {str(f): base64.b64encode(c).decode() if c is not None else None for f, c in saved.items()}}
    partial = journal.with_name(journal.name + ".tmp")
    partial.write_text(json.dumps(state))
    partial.replace(journal)  # the journal is whole before anything moves
    if path.exists():
        path.replace(backup)
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        if backup.exists():
            backup.replace(path)
        for file, content in saved.items():
            if content is None:
                file.unlink(missing_ok=True)
            else:
                file.write_bytes(content)
        for rel in sorted(_tree(cache) - cached, key=lambda r: r.count(os.sep), reverse=True):
            added = cache / rel
            if added.is_dir() and not added.is_symlink():
                shutil.rmtree(added, ignore_errors=True)
            else:
                added.unlink(missing_ok=True)
        journal.unlink(missing_ok=True)
        raise
    if backup.exists():
        backup.replace(discard)  # the commit point: from here a killed ingest's version stands
    journal.unlink()
    shutil.rmtree(discard, ignore_errors=True)


def dataset_version(path: Path, root: Path | None = None) -> DatasetVersion | None:
    """The recorded version of `path` if its folder matches it now; None when untracked or modified."""
    path, root = _locate(path, root)
    if root is None:
        return None
    with _repo(root) as repo:
        stage, out = _find_out(repo, path)
        if out is None or not out.hash_info:
            return None
        if out.changed():
            return None
        return DatasetVersion(path.name, os.path.relpath(path, root), out.hash_info.value, _pointer(stage, root), False)


def record_stages(root: Path, stages: list[str]) -> list[str]:
    """Record the current outputs of dvc.yaml stages in dvc.lock (`dvc commit`), for stages that exist.

    `udaflow run` with params.yaml's own settings runs exactly what these stages describe, with the
    same code; recording its outputs keeps `dvc status` truthful and lets `dvc repro` skip them.
    """
    root = Path(root).resolve()
    if inside_dvc_stage() or not (root / "dvc.yaml").exists() or not (root / ".dvc").is_dir():
        return []
    done = []
    with _repo(root) as repo:
        known = {s.addressing for s in repo.index.stages}
        for name in stages:
            if name in known:
                try:
                    repo.commit(name, force=True)
                except Exception as exc:  # noqa: BLE001 - an output the stage names was not written
                    raise VersioningError(f"dvc.yaml stage '{name}': could not record its outputs: {exc}") from exc
                done.append(name)
    return done


def status(root: Path) -> dict:
    """`dvc status` as a dict: empty means data and pipelines are up to date."""
    with _repo(root) as repo:
        return repo.status()


def restore_dataset(md5: str, dest: Path, root: Path) -> Path:
    """Check out the folder whose DVC hash is `md5` into `dest`, from the cache or the default remote."""
    from dvc_data.hashfile.hash_info import HashInfo

    dest = Path(dest)
    what = f"dataset '{dest.name}' at DVC version {md5}"
    hint = ("that version was never pushed, or the cache and remote were cleaned since: `dvc push` it from a clone that has "
            "it, or point the default remote (`dvc remote default`) at the storage that holds it")
    with _repo(root) as repo:
        odb = repo.cache.local
        hash_info = HashInfo("md5", md5 if md5.endswith(".dir") else f"{md5}.dir")
        try:
            # fetch what the cache lacks from the default remote (the .dir object and its files)
            result = repo.cloud.pull({hash_info})
            if result.failed:
                raise VersioningError(f"{what} is in neither the DVC cache nor the default remote", hint)
        except VersioningError:
            raise
        except Exception as exc:  # noqa: BLE001 - no remote configured, remote unreachable, ...
            if not odb.exists(hash_info.value):
                raise VersioningError(f"{what} is in neither the DVC cache nor the remote: {exc}", hint) from exc
        from dvc_data.hashfile.tree import Tree

        try:
            tree = Tree.load(odb, hash_info)
        except Exception as exc:  # noqa: BLE001
            raise VersioningError(f"{what} is missing from the DVC cache ({odb.path}): {exc}", hint) from exc
        missing = {entry for _, _, entry in tree if not odb.exists(entry.value)}
        if missing:
            try:
                repo.cloud.pull(missing)
            except Exception:  # noqa: BLE001 - reported per file below
                pass
        tmp = dest.with_name(dest.name + ".restoring")
        shutil.rmtree(tmp, ignore_errors=True)
        for key, _, entry_hash in tree:
            src = odb.oid_to_path(entry_hash.value)
            if not os.path.exists(src):
                raise VersioningError(f"{what}: its file {'/'.join(key)} ({entry_hash.value}) is in neither the DVC cache nor the remote", hint)
            out = tmp.joinpath(*key)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.replace(dest)
    return dest
