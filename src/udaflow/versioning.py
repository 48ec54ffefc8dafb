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
import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

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
    _say_if_dvc_is_locked(Path(root))
    # wait for the repository lock as `dvc --wait-for-lock` does: DVC gives up after 3 s, and a run
    # versioning its data while another run or a `dvc push` held the lock failed ("Unable to acquire
    # lock"). DVC's default lock is an flock, which a killed holder frees (with core.hardlink_lock,
    # a killed holder's lock file stays until removed: the line above names it)
    repo = Repo(str(root), _wait_for_lock=True)
    try:
        yield repo
    finally:
        repo.close()


def _say_if_dvc_is_locked(root: Path) -> None:
    """One line on stderr when another process holds DVC's repository lock: the wait that follows is not a hang."""
    import zc.lockfile

    lockfile = root / ".dvc" / "tmp" / "lock"
    if not lockfile.exists():
        return
    try:
        zc.lockfile.LockFile(str(lockfile)).close()  # DVC's own lock: taken and given back at once
    except zc.lockfile.LockError:
        sys.stderr.write(f"waiting for DVC's repository lock ({lockfile}: another dvc command or udaflow run holds it)\n")
        sys.stderr.flush()


@contextmanager
def _dvc_logs_off():
    """Where the caller raises one error of its own for an object missing from cache and remote: DVC logs
    it first ("Some of the cache files do not exist neither locally nor on remote", "failed to transfer"),
    on its own loggers and again through whatever handles the root logger (Prefect's, in a flow)."""
    loggers = [logging.getLogger(name) for name in ("dvc", "dvc_data")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


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


def first_commit_recording(pointer: str, md5: str, root: Path) -> str | None:
    """The oldest git commit (short hash) whose `pointer` recorded hash `md5`, or None: tells a replace back to an
    earlier version from new content."""
    import subprocess

    try:
        log = subprocess.run(["git", "log", "--all", "--reverse", "--format=%h", f"-S{md5}", "--", pointer], cwd=root,
                             capture_output=True, text=True, check=True).stdout.split()
    except (subprocess.CalledProcessError, FileNotFoundError):  # no git, or no commit yet
        return None
    return log[0] if log else None


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


def _restore_ignore(path: Path, saved: bytes | None, ignored: bool) -> None:
    """The .gitignore beside `path` as it was when only this folder's `/<name>` line differs, else that line alone."""
    ignore, line = path.parent / ".gitignore", f"/{path.name}"
    now = ignore.read_bytes() if ignore.exists() else None
    others = lambda b: [x for x in (b or b"").decode(errors="replace").splitlines() if x != line]  # noqa: E731
    if now != saved and others(now) == others(saved):
        if saved is None:
            ignore.unlink(missing_ok=True)
        else:
            ignore.write_bytes(saved)
    else:
        _ignore_line(path, ignored)


def _file_md5s(folder: Path) -> set[str]:
    """The md5 of every file under `folder` (DVC 3 names a file's cache object by it)."""
    import hashlib

    found: set[str] = set()
    for here, _, files in os.walk(folder):
        for name in files:
            digest = hashlib.md5()
            with contextlib.suppress(OSError), open(os.path.join(here, name), "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
                found.add(digest.hexdigest())
    return found


def _dir_listing(cache: Path, md5: str) -> set[str]:
    """The md5s a `<md5>.dir` object lists (DVC 3's layout, then DVC 2's); empty when it is not there."""
    bare = md5.removesuffix(".dir")
    for obj in (cache / "files" / "md5" / bare[:2] / (bare[2:] + ".dir"), cache / bare[:2] / (bare[2:] + ".dir")):
        try:
            return {entry["md5"] for entry in json.loads(obj.read_text())}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return set()


def _protected_objects(root: Path, cache: Path, path: Path) -> set[str]:
    """Object md5s another version references: the other `.dvc` pointers beside `path` and dvc.lock's outputs
    (their `.dir` objects and what those list). A concurrent ingest of the same images under another name
    shares them: they must stay when this ingest rolls back."""
    import yaml

    refs: set[str] = set()
    sources = [(p, "outs") for p in path.parent.glob("*.dvc") if p.name != path.name + ".dvc"] + [(root / "dvc.lock", "stages")]
    for file, kind in sources:
        try:
            doc = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        outs = doc.get("outs") or [] if kind == "outs" else [o for st in (doc.get("stages") or {}).values() for o in (st or {}).get("outs") or []]
        for out in outs:
            md5 = out.get("md5") if isinstance(out, dict) else None
            if isinstance(md5, str):
                refs.add(md5)
                if md5.endswith(".dir"):
                    refs |= _dir_listing(cache, md5)
    return refs


def _remove_new_objects(cache: Path, before: set[str], ours: set[str], protected: set[str]) -> None:
    """Delete the cache objects added since `before` that hold this ingest's files (md5 in `ours`), and its
    folder listings (`<md5>.dir` objects listing only such files), unless another version references them
    (`protected`). Objects other processes added stay."""
    def md5_of(rel: str) -> str:
        parts = Path(rel).parts  # files/md5/ab/cdef... (DVC 3) or ab/cdef... (DVC 2)
        return (parts[-2] + parts[-1]) if len(parts) >= 2 else parts[-1]

    for rel in sorted(_tree(cache) - before, key=lambda r: r.count(os.sep), reverse=True):
        added = cache / rel
        if added.is_dir() and not added.is_symlink():
            with contextlib.suppress(OSError):
                added.rmdir()  # a prefix folder this ingest's objects alone made
            continue
        md5 = md5_of(rel)
        if md5 in protected:
            continue
        if md5.endswith(".dir"):
            try:
                listed = {entry["md5"] for entry in json.loads(added.read_text())}
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not listed <= ours:
                continue
        elif md5 not in ours:
            continue
        added.unlink(missing_ok=True)


def _ingest_files(path: Path, root: Path) -> list[Path]:
    """The git-tracked files an ingest of the folder `path` may rewrite: its pointer, the .gitignore beside it, dvc.lock."""
    return [path.with_name(path.name + ".dvc"), path.parent / ".gitignore", root / "dvc.lock"]


def _aside(path: Path, what: str) -> Path:
    """`.<name>.<what>` beside the dataset folder: previous (the content being replaced), discard (the
    replaced content of a finished ingest, being deleted), ingest.json (the journal of an ingest under way)."""
    return path.with_name(f".{path.name}.{what}")


@contextmanager
def _ingest_lock(path: Path, root: Path | None):
    """One ingest, or recovery, of a domain name at a time: an exclusive lock on
    `.dvc/tmp/udaflow-ingest/<name>.lock` (DVC keeps .dvc/tmp out of git), taken without waiting. The
    kernel releases it when its process dies, however it dies, so a held lock means a live ingest."""
    import fcntl

    if root is None:  # no DVC project: nothing can be ingested there, nor be left half-done
        yield
        return
    lock = root / ".dvc" / "tmp" / "udaflow-ingest" / f"{path.name}.lock"
    if str(lock) in _HELD:  # this process holds it already (an ingest's whole span, then its versioning step)
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VersioningError(f"{path}: an ingest of '{path.name}' is under way; wait for it to finish",
                                  f"`udaflow data ingest` holds {lock} while it runs") from None
        _HELD.add(str(lock))
        try:
            yield
        finally:
            _HELD.discard(str(lock))
            fcntl.flock(fh, fcntl.LOCK_UN)


_HELD: set[str] = set()  # the ingest locks this process holds: flock conflicts with itself on a second open


@contextmanager
def ingest_lock(path: Path, root: Path | None = None):
    """The domain name's ingest lock (`_ingest_lock`) for a whole ingest: from before its copy is staged
    under the name until it is versioned. Taken only at versioning, two ingests of one name both staged
    into the same `.<name>.ingesting` folder, and one committed the other's images under its own summary."""
    path, root = _locate(path, root)
    with _ingest_lock(path, root):
        yield


def _ignore_line(path: Path, present: bool) -> None:
    """Put the `/<name>` line DVC writes for the folder `path` into the .gitignore beside it, or take it out."""
    ignore, line = path.parent / ".gitignore", f"/{path.name}"
    lines = ignore.read_text().splitlines() if ignore.exists() else []
    if (line in lines) == present:
        return
    lines = [*lines, line] if present else [x for x in lines if x != line]
    if lines:
        ignore.write_text("\n".join(lines) + "\n")
    else:
        ignore.unlink()


def _remove(folder: Path) -> None:
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise VersioningError(f"{folder}: left by an interrupted ingest and cannot be removed ({exc})", "remove it by hand") from None


def recover_interrupted_ingest(path: Path, root: Path | None = None) -> str | None:
    """Finish what an ingest of the folder `path` that was killed outright (SIGKILL, a power cut: no
    chance to roll back) left half-done, from its journal (`.<name>.ingest.json`, written before
    anything moved); returns a line saying what was done, or None when nothing was left.

    Killed before it had finished, the ingest is rolled back: when its new copy was in place, that copy
    goes (the user's own folder, which it was copied from, is untouched), and the `<name>.dvc` pointer
    and the folder's `.gitignore` line are as before it (only `dvc add` writes them, after the copy);
    the previous folder (`.<name>.previous`) goes back in place. Killed after it had finished (the
    replaced folder renamed to `.<name>.discard`), its version stays and the leftovers go. DVC cache
    objects a killed ingest added stay; `dvc gc` removes them. An ingest still running holds the
    name's lock (`_ingest_lock`): VersioningError.
    """
    path, root = _locate(path, root)
    if not any(_aside(path, what).exists() for what in ("ingest.json", "previous", "discard")):
        return None  # nothing left behind: no lock taken, so runs sharing a domain never meet on it
    with _ingest_lock(path, root):
        return _recover(path)


def _recover(path: Path) -> str | None:
    """`recover_interrupted_ingest` with the name's lock held."""
    journal, backup, discard = _aside(path, "ingest.json"), _aside(path, "previous"), _aside(path, "discard")
    if not journal.exists():
        _remove(discard)  # a finished ingest killed while it deleted the content it replaced
        if backup.exists() and path.exists():  # no journal: left by an udaflow from before the journal
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
        pointer = base64.b64decode(state["pointer"]) if state["pointer"] is not None else None
        had_previous, ignored, when = bool(state["had_previous"]), bool(state["ignored"]), state.get("started", "?")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VersioningError(f"{journal}: the journal of an interrupted ingest of '{path.name}' cannot be read ({exc})",
                              f"keep the version you want at {path} (the one before is in {backup} if it exists), then delete {journal}") from None
    who = f"pid {state.get('pid', '?')} on {state.get('host', '?')}, started {when}"
    if discard.exists() and not backup.exists():  # past the commit point: its version stands
        journal.unlink()
        _remove(discard)
        return f"{path}: an ingest killed while it cleaned up ({who}) had finished; its version stays"
    new_in_place = path.exists() and (backup.exists() or not had_previous)
    if new_in_place:
        _remove(path)
    if backup.exists():
        backup.replace(path)
    if new_in_place:  # `dvc add` may have run: the pointer and the .gitignore line as they were
        file = path.with_name(path.name + ".dvc")
        if pointer is None:
            file.unlink(missing_ok=True)
        else:
            file.write_bytes(pointer)
        _ignore_line(path, ignored)
    _remove(discard)
    journal.unlink()
    left = "the previous version is in place" if had_previous else f"'{path.name}' did not exist before it, and does not now"
    return f"{path}: an ingest killed before it finished ({who}) was rolled back; {left}"


def _in_use_lock(path: Path, root: Path) -> Path:
    return root / ".dvc" / "tmp" / "udaflow-ingest" / f"{path.name}.in-use"


@contextmanager
def domains_in_use(paths: Iterable[Path]):
    """Shared locks on the domain folders a run reads (`.dvc/tmp/udaflow-ingest/<name>.in-use`), held from
    before it validates and versions them until its gate: an ingest replacing one of them waits for every
    such run to end (`rollback_on_failure`). Before, a `--replace` finished under a running run: it trained
    on the old images and was evaluated and gated on the new ones, its run recording the old DVC hash.
    A replacing ingest already swapping the folder: VersioningError, as for one under way."""
    import fcntl
    from contextlib import ExitStack

    with ExitStack() as stack:
        for folder in dict.fromkeys(Path(p).resolve() for p in paths):
            folder, root = _locate(folder, None)
            if root is None:
                continue
            lock = _in_use_lock(folder, root)
            lock.parent.mkdir(parents=True, exist_ok=True)
            marker, fh = (stack.enter_context(open(f, "a+")) for f in (lock.with_suffix(".replacing"), lock))
            try:
                fcntl.flock(marker, fcntl.LOCK_SH | fcntl.LOCK_NB)  # an ingest waiting to replace it holds this
                fcntl.flock(marker, fcntl.LOCK_UN)
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise VersioningError(f"{folder}: an ingest or a build of '{folder.name}' is replacing it; wait for it to finish",
                                      f"`udaflow data ingest --replace` and `udaflow data build` hold {lock} while they swap the folder") from None
            stack.callback(fcntl.flock, fh, fcntl.LOCK_UN)
        yield


@contextmanager
def _replacing(path: Path, root: Path, wait: bool = True):
    """The domain's in-use lock, exclusive: waits (saying so) for the runs reading the folder to end, or with
    `wait=False` raises VersioningError at once."""
    import fcntl

    lock = _in_use_lock(path, root)
    lock.parent.mkdir(parents=True, exist_ok=True)
    # first the marker runs check without waiting: on Linux a waiting LOCK_EX lets new LOCK_SH holders in,
    # so runs starting while this waits (scheduled retrains) would keep it waiting for good
    with open(lock.with_suffix(".replacing"), "a+") as marker, open(lock, "a+") as fh:
        try:
            # an ingest holds the name's ingest lock first: no other ingest of it contends; a builder may meet one
            fcntl.flock(marker, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise VersioningError(
                    f"{path}: udaflow run(s) or an ingest are reading or replacing '{path.name}'; rebuilding it under them "
                    "would change the data they train, evaluate and gate on",
                    "run the same command again once they finish (`dvc repro` cannot wait here: a run versioning its "
                    "data waits for the DVC lock `dvc repro` holds)") from None
            sys.stderr.write(f"waiting for the udaflow run(s) reading '{path.name}' to finish: replacing it under them would "
                             "change the data they train, evaluate and gate on\n")
            sys.stderr.flush()
            fcntl.flock(marker, fcntl.LOCK_EX)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fcntl.flock(marker, fcntl.LOCK_UN)


@contextmanager
def replacing_domain(path: Path):
    """A builder's swap of the domain folder `path` (`udaflow data build`), as a replacing ingest's: held
    exclusive against the runs reading it. A build swapped the folder under a running run (a probe: `dvc repro
    -f` beside `udaflow run`, which then failed in evaluate with the domain gone). It waits for them, saying
    so; inside `dvc repro` it refuses at once instead (VersioningError): a run versioning its data waits for the
    DVC lock that `dvc repro` holds, so each would wait for the other. Outside a DVC project, or for a folder
    not there yet, nothing to hold."""
    path, root = _locate(Path(path), None)
    if root is None or not path.exists():
        yield
        return
    with _replacing(path, root, wait=not inside_dvc_stage()):
        yield


@contextmanager
def rollback_on_failure(path: Path, root: Path | None = None, changes_content: bool = True):
    """A new version of the dataset folder `path` goes in place inside this block, all or nothing.

    On entry the current folder (if any) moves aside to `.<name>.previous`; the block puts the new
    one at `path` and versions it. If the block raises (a failed copy, validation, `dvc add`, a
    push, Ctrl-C), what this ingest changed is put back as it was: the folder, its `<name>.dvc`
    pointer, its line in the `.gitignore` beside it, and the DVC cache objects holding its files that no
    other pointer or stage output references. What other processes wrote meanwhile (another name's
    ingest, a run's or a hand-made `dvc commit`, dvc.lock, which an ingest never writes) stays. On success the moved-aside folder is deleted; its content stays in the DVC cache and
    remote under its old hash.

    A process killed outright inside the block cannot roll back: a journal written on entry
    (`.<name>.ingest.json`: the pointer's bytes, whether the folder existed and was git-ignored)
    lets the next ingest of the name, or the next pipeline run reading it, do it
    (`recover_interrupted_ingest`). The name's lock is held throughout, so neither touches a live one.
    """
    path, root = _locate(path, root)
    if root is None:
        raise VersioningError(f"{path}: not inside a DVC project; run `dvc init` (or `make setup`) at the repository root")
    with _ingest_lock(path, root), (_replacing(path, root) if path.exists() and changes_content else contextlib.nullcontext()):
        _recover(path)
        backup, journal, discard = _aside(path, "previous"), _aside(path, "ingest.json"), _aside(path, "discard")
        with _repo(root) as repo:
            cache = Path(repo.cache.legacy.path)
        saved = {f: f.read_bytes() if f.exists() else None for f in _ingest_files(path, root)}
        cached = _tree(cache)
        pointer = saved[path.with_name(path.name + ".dvc")]
        ignore = saved[path.parent / ".gitignore"]
        state = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "had_previous": path.exists(), "pointer": base64.b64encode(pointer).decode() if pointer is not None else None,
                 "ignored": ignore is not None and f"/{path.name}" in ignore.decode(errors="replace").splitlines()}
        partial = journal.with_name(journal.name + ".tmp")
        with open(partial, "w") as fh:
            fh.write(json.dumps(state))
            fh.flush()
            os.fsync(fh.fileno())
        partial.replace(journal)  # the journal is whole, and on disk, before anything moves
        if path.exists():
            path.replace(backup)
        try:
            yield path
        except BaseException:
            # undo what THIS ingest did, nothing more: other ingests (of other names: the lock is per name), a
            # `udaflow run` or a hand-made `dvc commit` may have written the shared cache, the .gitignore and
            # dvc.lock meanwhile (restoring their bytes, and deleting every object new since entry, undid theirs)
            ours = _file_md5s(path)  # the new version's content, before it goes
            shutil.rmtree(path, ignore_errors=True)
            if backup.exists():
                backup.replace(path)
            file = path.with_name(path.name + ".dvc")  # this name's own: no other process writes it under the lock
            if pointer is None:
                file.unlink(missing_ok=True)
            else:
                file.write_bytes(pointer)
            _restore_ignore(path, saved[path.parent / ".gitignore"], state["ignored"])  # this name's line only
            # dvc.lock is left as it is: an ingest refuses a stage's output (data/ingest.py), so only others wrote it
            _remove_new_objects(cache, cached, ours, _protected_objects(root, cache, path))
            journal.unlink(missing_ok=True)
            raise
        if backup.exists():
            backup.replace(discard)  # the commit point: from here a killed ingest's version stands
        journal.unlink()
        shutil.rmtree(discard, ignore_errors=True)  # a leftover is removed (strictly) by the next ingest of the name


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


def code_dependencies(root: Path) -> dict[str, dict[str, str]]:
    """{stage: {code path: DVC hash as the files are now}} for each dvc.yaml stage's dependencies under
    src/ (a file's md5, a folder's `<md5>.dir`, .dvcignore applied: no `__pycache__`): what `dvc status`
    compares with dvc.lock's. Read-only; only running the stages (`make run`, `dvc repro`) records them."""
    root = Path(root).resolve()
    found: dict[str, dict[str, str]] = {}
    with _repo(root) as repo:
        for stage in repo.index.stages:
            for dep in stage.deps:
                if dep.def_path.startswith("src/"):
                    found.setdefault(stage.name, {})[dep.def_path] = dep.get_hash().value
    return found


def status(root: Path) -> dict:
    """`dvc status` as a dict: empty means data and pipelines are up to date."""
    with _repo(root) as repo:
        return repo.status()


def restore_dataset(md5: str, dest: Path, root: Path, announce: bool = False) -> Path:
    """Check out the folder whose DVC hash is `md5` into `dest`, from the cache or the default remote.
    `announce`: first say so on stderr (`udaflow reproduce`: a photo domain's download and copy take minutes)."""
    from dvc_data.hashfile.hash_info import HashInfo

    dest = Path(dest)
    what = f"dataset '{dest.name}' at DVC version {md5}"
    if announce:
        sys.stderr.write(f"restore {what} into {dest} (from the DVC cache; what it lacks, from the default remote)\n")
        sys.stderr.flush()
    hint = ("that version was never pushed, or the cache and remote were cleaned since: `dvc push` it from a clone that has "
            "it, or point the default remote (`dvc remote default`) at the storage that holds it")
    with _repo(root) as repo:
        odb = repo.cache.local
        hash_info = HashInfo("md5", md5 if md5.endswith(".dir") else f"{md5}.dir")
        try:
            # fetch what the cache lacks from the default remote (the .dir object and its files)
            with _dvc_logs_off():
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
            # the pull above found it in neither (DVC only warns when the remote lacks it)
            raise VersioningError(f"{what} is in neither the DVC cache ({odb.path}) nor the default remote: {exc}", hint) from exc
        missing = {entry for _, _, entry in tree if not odb.exists(entry.value)}
        if missing:
            try:
                with _dvc_logs_off():
                    repo.cloud.pull(missing)
            except Exception:  # noqa: BLE001 - reported per file below
                pass
        files = [(key, entry_hash.value, odb.oid_to_path(entry_hash.value)) for key, _, entry_hash in tree]
        gone = [(key, oid) for key, oid, src in files if not os.path.exists(src)]
        if gone:  # before a file is copied: a failed restore leaves no half-copied folder behind
            (key, oid), more = gone[0], f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
            raise VersioningError(f"{what}: its file {'/'.join(key)} ({oid}){more} is in neither the DVC cache nor the remote", hint)
        tmp = dest.with_name(dest.name + ".restoring")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for key, _, src in files:
                out = tmp.joinpath(*key)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, out)
        except BaseException:  # a full disk, a Ctrl-C: nothing partial stays
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(dest, ignore_errors=True)
        tmp.replace(dest)
    return dest
