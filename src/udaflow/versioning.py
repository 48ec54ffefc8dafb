"""DVC: version a dataset, read its content hash, restore a past version. The one place DVC is used.

A domain folder data/raw/<name> is tracked either as the output of a `dvc.yaml` stage (the
built-in domains: `build@synth`, ... are reproducible from code, so `dvc repro` rebuilds them) or
by a `data/raw/<name>.dvc` file (user folders from `udaflow data ingest`). `version_dataset`
handles both: it commits the new content to the DVC cache, records its hash in git's pointer file
(`dvc.lock` or `<name>.dvc`) and pushes it to the default remote. The hash is the dataset's
identity everywhere else (MLflow dataset digests, cache keys, reproduction).
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_REMOTE = "local"


class VersioningError(RuntimeError):
    """DVC could not record or restore a dataset; the message names the path."""


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


def version_dataset(path: Path, root: Path | None = None, push: bool = True) -> DatasetVersion:
    """Commit `path` to the DVC cache (new content only), record its hash, push to the default remote."""
    path = Path(path).resolve()
    root = Path(root).resolve() if root else find_root(path)
    if root is None:
        raise VersioningError(f"{path}: not inside a DVC project; run `dvc init` (or `make setup`) at the repository root")
    if not path.is_dir():
        raise VersioningError(f"{path}: no such dataset folder")
    try:
        with _repo(root) as repo:
            stage, out = _find_out(repo, path)
            before = out.hash_info.value if out is not None and out.hash_info else None
            if stage is not None and stage.is_data_source:
                stage, = repo.add(str(path))
            elif stage is not None:
                repo.commit(stage.addressing, force=True)
            else:
                stage, = repo.add(str(path))
            stage, out = _find_out(repo, path)
            md5 = out.hash_info.value
            if push and repo.config.get("core", {}).get("remote"):
                repo.push(targets=[str(path)])
            return DatasetVersion(path.name, os.path.relpath(path, root), md5, _pointer(stage, root), md5 != before)
    except VersioningError:
        raise
    except Exception as exc:  # dvc raises many types; the user needs the path and the reason
        raise VersioningError(f"{path}: DVC could not version this dataset: {exc}") from exc


def dataset_version(path: Path, root: Path | None = None) -> DatasetVersion | None:
    """The recorded version of `path` if its folder matches it now; None when untracked or modified."""
    path = Path(path).resolve()
    root = Path(root).resolve() if root else find_root(path)
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
    with _repo(root) as repo:
        odb = repo.cache.local
        hash_info = HashInfo("md5", md5 if md5.endswith(".dir") else f"{md5}.dir")
        try:
            # fetch what the cache lacks from the default remote (the .dir object and its files)
            result = repo.cloud.pull({hash_info})
            if result.failed:
                raise VersioningError(f"DVC object {md5} is in neither the cache nor the default remote")
        except VersioningError:
            raise
        except Exception as exc:  # noqa: BLE001 - no remote configured, remote unreachable, ...
            if not odb.exists(hash_info.value):
                raise VersioningError(f"DVC object {md5} is in neither the cache nor the remote: {exc}") from exc
        from dvc_data.hashfile.tree import Tree

        try:
            tree = Tree.load(odb, hash_info)
        except Exception as exc:  # noqa: BLE001
            raise VersioningError(f"DVC object {md5} is missing from the cache ({odb.path}): {exc}") from exc
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
                raise VersioningError(f"DVC object for {'/'.join(key)} ({entry_hash.value}) is in neither the cache nor the remote")
            out = tmp.joinpath(*key)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.replace(dest)
    return dest
