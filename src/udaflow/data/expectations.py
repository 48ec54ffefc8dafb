"""Great Expectations (1.x) suites that gate a source -> target shift before any training.

The frame GX sees is built from each domain's manifest *and* the files on disk: every image is
re-read, so a PNG corrupted or swapped after the manifest was written is caught too.

Suite `udaflow.images` (one row per image of both domains):
  required columns; unique (domain, path); file checksum equals the manifest's; one checksum per
  image across both domains (a shared checksum is leakage: source<->target or target train<->test),
  and one decoded picture (`pixels.pixel_digest`: the same leak re-saved in other bytes);
  decodable; mode in an allowed set; width/height in range; target labels within the source
  classes; a non-empty target.
Suite `udaflow.classes` (one row per source class): at least `min_per_class` images each.
Suite `udaflow.domain` (one domain alone, what `udaflow data ingest` checks without `--source`):
  the image checks above that need no second domain.

`validate_shift` returns a `ValidationReport`; `report.error()` is the one-line reason a flow stops
with (expectation, example rows). The full GX result JSON and the Data Docs HTML are written to
`out_dir` for tracking to store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from udaflow.data.manifest import COLUMNS, MANIFEST_NAME, DataError, describe_image_pixels, missing_domain_hint, read_manifest
from udaflow.data.pixels import settle

ALLOWED_MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I", "F", "CMYK", "YCbCr"]
MIN_SIDE, MAX_SIDE = 8, 4096  # decompression bombs and thumbnails are both refused
# the frame GX checks: the manifest's columns, what the file on disk hashes to now, and its decoded pixels' digest
FRAME_COLUMNS = ["domain", "role", *COLUMNS, "disk_sha256", "pixels"]


@dataclass
class Failure:
    suite: str
    expectation: str
    column: str | None
    examples: list[dict[str, Any]]
    summary: str | None = None  # the failure in the data's own terms, where GX's expectation name is not enough

    def describe(self) -> str:
        where = f" on '{self.column}'" if self.column else ""
        if self.summary:
            return f"{self.summary} ({self.expectation}{where})"
        ex = "; ".join(
            ", ".join(f"{k}={v}" for k, v in row.items() if k in ("domain", "split", "path", "label", "mode", "count", "width"))
            for row in self.examples[:3]
        )
        return f"{self.expectation}{where} failed (e.g. {ex})" if ex else f"{self.expectation}{where} failed"


@dataclass
class ValidationReport:
    success: bool
    failures: list[Failure] = field(default_factory=list)
    result_json: Path | None = None
    data_docs: Path | None = None
    statistics: dict[str, Any] = field(default_factory=dict)
    data_root: Path | None = None  # where the domains checked are (the hint names it)

    def hint(self) -> str:
        """A run's, stage's or bench's failed validation: what to do about its first failure (not the params hint
        its command has for other errors), after what was left untouched."""
        first = self.failures[0] if self.failures else None
        untouched = "nothing was trained, versioned or registered"
        replace = "`udaflow data ingest DIR --name NAME --replace`"
        if first is not None and first.suite == "udaflow.images" and first.column == "label":  # target classes the source lacks
            return f"{untouched}; pair the target with a source that has those classes, or ingest the target again without them ({replace})"
        if first is not None and first.suite == "udaflow.classes":
            return f"{untouched}; name a source with two classes or more and data.min_per_class images of each"
        if first is not None and (first.expectation, first.column) in (("expect_column_values_to_be_unique", "sha256"),
                                                                        ("expect_column_values_to_be_unique", "pixels")):
            return f"{untouched}; take the copies out of the folder that holds them and make it that domain's new version ({replace})"
        root = self.data_root if self.data_root is not None else "<data.root>"
        return (f"{untouched}; `dvc checkout {root}/<name>` restores a domain's versioned files, {replace} makes a corrected "
                "folder its new version")

    def _same_files(self) -> str:
        """", on the same file" when every other failure's examples are files the first one names: one broken or
        hand-added file fails four to seven expectations, which read as that many problems."""
        def files(f: Failure) -> set[tuple[str, str]]:
            return {(e.get("domain", ""), e.get("path", "")) for e in f.examples if e.get("path")}

        first = files(self.failures[0])
        if not first or not all(f.examples and files(f) and files(f) <= first for f in self.failures[1:]):
            return ""
        return f", on the same file{'s' if len(first) > 1 else ''}"

    def error(self) -> str:
        first = self.failures[0].describe() if self.failures else "unknown failure"
        more = f" (+{len(self.failures) - 1} more failed expectations{self._same_files()})" if len(self.failures) > 1 else ""
        return f"data validation failed: {first}{more}; full report: {self.data_docs or self.result_json}"


def image_frame(data_root: Path, source: str, target: str | None = None):
    """One row per image of both domains (or of `source` alone): manifest columns + what the file on disk says now."""
    import pandas as pd

    records = []
    for role, name in (("source", source), ("target", target)) if target else (("domain", source),):
        root = Path(data_root) / name
        if not root.is_dir():
            raise DataError(f"{root}: domain '{name}' not found; {missing_domain_hint(root, name)}")
        for row in read_manifest(root):
            file = root / row.path
            rec = {"domain": name, "role": role, **row.__dict__}
            if not file.resolve().is_relative_to(root.resolve()):
                rec.update(disk_sha256="", decodable=False, pixels=None)  # a symlink or `..` escaping the root
            elif not file.is_file():
                rec.update(disk_sha256="", decodable=False, pixels=None)
            else:
                now, pixels = describe_image_pixels(file, root, row.label, row.split)
                rec.update(disk_sha256=now.sha256, decodable=now.decodable, width=now.width, height=now.height, mode=now.mode, pixels=pixels)
            records.append(rec)
        # a file put in the folder by hand since: no manifest checksum (the checksum check fails on it), where before
        # only listed files were read and a run's DVC commit of the folder versioned it unseen
        for file in unlisted_files(root, {r["path"] for r in records if r["domain"] == name}):
            records.append({"domain": name, "role": role, "path": file.relative_to(root).as_posix(), "label": "", "split": "", "sha256": "",
                            "width": 0, "height": 0, "mode": "", "decodable": False,
                            "disk_sha256": hashlib.sha256(file.read_bytes()).hexdigest(), "pixels": None})
    frame = pd.DataFrame.from_records(records, columns=FRAME_COLUMNS)
    # the pixel check is for the same picture in other bytes: a byte-for-byte copy is the checksum check's to name
    # (the first of its files with a digest keeps it, so a third, re-encoded copy is still found)
    digested = frame[frame.pixels.notna() & frame.disk_sha256.ne("")]
    frame.loc[digested.index[digested.disk_sha256.duplicated()], "pixels"] = None
    # a large image's sketch that another repeats: its exact digest (`pixels.settle`), so equal values are the same picture
    frame["pixels"] = settle([v if isinstance(v, str) else None for v in frame.pixels],
                             [Path(data_root) / domain / path for domain, path in zip(frame.domain, frame.path)])
    return frame


def unlisted_files(root: Path, listed: set[str]) -> list[Path]:
    """Files under domain folder `root` that its manifest does not list (paths relative to `root` in `listed`),
    leaving out the manifest and what the project's .dvcignore keeps out of DVC's version of the folder."""
    from fnmatch import fnmatch

    from udaflow.versioning import find_root

    project = find_root(root)
    ignore = project / ".dvcignore" if project else None
    patterns = [line.strip() for line in ignore.read_text().splitlines()
                if line.strip() and not line.startswith("#")] if ignore and ignore.is_file() else []

    def ignored(parts: list[str]) -> bool:  # .dvcignore's simple patterns: `name`, `*.ext`, `dir/`
        return any(any(fnmatch(part, pattern.rstrip("/")) for part in (parts[:-1] if pattern.endswith("/") else parts))
                   for pattern in patterns)

    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            file = Path(folder) / name
            relative = file.relative_to(root).as_posix()
            if relative != MANIFEST_NAME and relative not in listed and not ignored(relative.split("/")):
                found.append(file)
    return sorted(found)


def class_frame(images, min_per_class: int):
    import pandas as pd

    source = images[images.role == "source"]
    counts = source[source.label != ""].groupby("label").size()
    return pd.DataFrame({"domain": source.domain.iloc[0] if len(source) else "", "label": counts.index, "count": counts.values})


def _domain_expectations():
    """What every image of any domain must satisfy, paired with another domain or not."""
    import great_expectations as gx

    E = gx.expectations
    return [
        E.ExpectTableColumnsToMatchSet(column_set=FRAME_COLUMNS, exact_match=True),
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectCompoundColumnsToBeUnique(column_list=["domain", "path"]),
        E.ExpectColumnPairValuesToBeEqual(column_A="sha256", column_B="disk_sha256"),
        E.ExpectColumnValuesToBeUnique(column="sha256"),
        E.ExpectColumnValuesToBeUnique(column="pixels"),  # the same picture in other bytes (None where it does not decode)
        E.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="mode", value_set=ALLOWED_MODES),
        E.ExpectColumnValuesToBeBetween(column="width", min_value=MIN_SIDE, max_value=MAX_SIDE),
        E.ExpectColumnValuesToBeBetween(column="height", min_value=MIN_SIDE, max_value=MAX_SIDE),
        E.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val", "test"]),
    ]


def _suites(source_classes: list[str], min_per_class: int):
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    # GX 1.x Condition objects (strings with a condition_parser are deprecated since GX 1.9); the
    # pandas engine runs them as the same queries: role == 'target' (and label != '')
    is_target = Column("role") == "target"
    target = {"row_condition": is_target}
    labelled_target = {"row_condition": is_target & (Column("label") != "")}
    images = [
        *_domain_expectations(),
        E.ExpectColumnDistinctValuesToContainSet(column="role", value_set=["source", "target"]),
        E.ExpectColumnValuesToBeInSet(column="label", value_set=source_classes, **labelled_target),
        E.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val", "test"], **target),
    ]
    classes = [
        E.ExpectTableRowCountToBeBetween(min_value=2),
        E.ExpectColumnValuesToBeBetween(column="count", min_value=min_per_class),
    ]
    return {"udaflow.images": images, "udaflow.classes": classes}


def validate_shift(data_root: Path, source: str, target: str, out_dir: Path, min_per_class: int = 5) -> ValidationReport:
    """Run both suites on the shift; write the GX result JSON and Data Docs under out_dir."""
    images = image_frame(data_root, source, target)
    source_classes = sorted({c for c in images[images.role == "source"].label if c})
    suites = _suites(source_classes, min_per_class)
    frames = {"udaflow.images": images, "udaflow.classes": class_frame(images, min_per_class)}
    report = _validate(f"{source}-to-{target}", {"source": source, "target": target}, suites, frames, images, out_dir)
    report.data_root = Path(data_root)
    for failure in report.failures:
        if (failure.suite, failure.expectation, failure.column) == ("udaflow.images", "expect_column_values_to_be_in_set", "label"):
            failure.summary = unknown_classes(images, source, target, source_classes)
        elif failure.suite == "udaflow.classes":
            failure.summary = source_classes_summary(failure, Path(data_root) / source, source_classes, min_per_class)
        elif failure.expectation == "expect_column_pair_values_to_be_equal":
            failure.summary = changed_files(failure, Path(data_root))
        elif (failure.suite, failure.expectation, failure.column) == ("udaflow.images", "expect_column_values_to_be_unique", "sha256"):
            failure.summary = shared_images(images, source, target)
        elif (failure.expectation, failure.column) == ("expect_column_values_to_be_unique", "pixels"):
            failure.summary = same_pixels(images, Path(data_root))
    return report


def shared_images(images, source: str, target: str) -> str | None:
    """The checksum-uniqueness failure in words when the duplicates span the two domains: the target holds source images."""
    by_role = {role: images[images.role == role] for role in ("source", "target")}
    shared = by_role["target"][by_role["target"].sha256.isin(set(by_role["source"].sha256))]
    if shared.empty:  # a duplicate inside one domain: GX's own example names it
        return None
    first = shared.iloc[0]
    twin = by_role["source"][by_role["source"].sha256 == first.sha256].iloc[0]
    return (f"{len(shared)} image(s) of target '{target}' are also in source '{source}' (e.g. {target}/{first.path} = {source}/{twin.path}); "
            "a target must be images the source does not hold")


def same_pixels(images, data_root: Path) -> str | None:
    """The pixel-uniqueness failure in words: which two files are the same picture in other bytes, and why that is refused."""
    decoded = images[images.pixels.notna()]
    twins = decoded[decoded.pixels.duplicated(keep=False)]
    if twins.empty:
        return None
    first = twins[twins.pixels == twins.pixels.iloc[0]]
    a, b = first.iloc[0], first.iloc[1]
    pairs = twins.pixels.nunique()
    what = (f"{len(twins) - pairs} image(s) repeat another's picture in other bytes (e.g. {a.domain}/{a.path} "
            f"and {b.domain}/{b.path} under {data_root} decode to the same pixels: a re-saved or converted copy)")
    if a.role != b.role:
        why = f"target '{b.domain if b.role == 'target' else a.domain}' holds source images; a target must be images the source does not hold"
    else:
        why = (f"a copy inside domain '{a.domain}' ({a.split} and {b.split}) counts one picture twice and, across splits, "
               "scores a model on what it trained on; remove one of each pair, or ingest the folder again without them")
    return f"{what}; {why}"


def source_classes_summary(failure: Failure, root: Path, source_classes: list[str], min_per_class: int) -> str | None:
    """The source's class checks in words: too few classes, or too few images of some class. They are
    about the source alone, so they name its folder (an ingest checking a folder against it too)."""
    if failure.expectation == "expect_table_row_count_to_be_between":
        has = "no labelled images" if not source_classes else f"one class ('{source_classes[0]}')" if len(source_classes) == 1 else None
        if has:
            return f"source '{root.name}' ({root}) has {has}: a source domain is labelled, a folder per class, with two classes or more"
    if failure.column == "count" and failure.examples:
        few = ", ".join(f"'{e['label']}' has {e['count']}" for e in failure.examples[:3])
        return (f"source '{root.name}' ({root}) has too few images of a class: {few}; each source class needs at least "
                f"{min_per_class} (data.min_per_class)")
    return None


def changed_files(failure: Failure, data_root: Path) -> str | None:
    """A checksum mismatch in words: which file is gone or was rewritten since its domain's manifest was written."""
    if not failure.examples:
        return None
    e = failure.examples[0]
    more = f" ({len(failure.examples) - 1} more at least)" if len(failure.examples) > 1 else ""
    folder = data_root / e["domain"]
    if not e.get("sha256"):
        return (f"{folder / e['path']} is not in the manifest of domain '{e['domain']}': it was put in the folder after the domain was built or "
                f"ingested{more}, and a run would version it unchecked; remove it, or ingest a folder that holds it with --replace")
    state = "is missing" if not e.get("disk_sha256") else "has changed"
    return (f"{folder / e['path']} {state} since domain '{e['domain']}' was built or ingested{more}: its checksum is not "
            f"the manifest's; `dvc checkout {folder}` restores the versioned files, or ingest the folder again")


def unknown_classes(images, source: str, target: str, source_classes: list[str]) -> str | None:
    """The label-set failure in words: which of the target's class folders the source lacks, and the source's classes."""
    labelled = images[(images.role == "target") & (images.label != "")]
    unknown = sorted(set(labelled.label) - set(source_classes))
    if not unknown or not source_classes:  # nothing to name (a source without labels is refused before)
        return None
    counts = labelled.label.value_counts()
    listed = ", ".join(f"'{c}' ({counts[c]} image{'s' if counts[c] != 1 else ''})" for c in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    known = ", ".join(f"'{c}'" for c in source_classes[:12]) + (f" ... ({len(source_classes)} in all)" if len(source_classes) > 12 else "")
    return f"target '{target}' has class(es) {listed} that source '{source}' does not have; its classes are {known}"


def validate_domain(data_root: Path, name: str, out_dir: Path) -> ValidationReport:
    """Suite `udaflow.domain` on one domain alone: what `udaflow data ingest` checks without a `--source`.

    Every image check of `udaflow.images` that needs no second domain: columns, unique paths and
    checksums (a duplicate image inside the domain), checksums match the files, decodable, modes,
    sizes, splits, at least one image. Class counts and label sets are checked when a run (or
    `--source`) pairs the domain with a source.
    """
    images = image_frame(data_root, name)
    suites = {"udaflow.domain": _domain_expectations()}
    report = _validate(name, {"domain": name}, suites, {"udaflow.domain": images}, images, out_dir)
    report.data_root = Path(data_root)
    for failure in report.failures:
        if (failure.expectation, failure.column) == ("expect_column_values_to_be_unique", "pixels"):
            failure.summary = same_pixels(images, Path(data_root))
    return report


_VOLATILE_META = ("batch_markers", "validation_id", "checkpoint_id", "run_id", "validation_time")


def _stable(result: dict[str, Any]) -> dict[str, Any]:
    """A GX validation result without its random ids and clock times: the same data gives the same
    JSON (dvc.yaml's `validate` stage records its hash in dvc.lock; Data Docs keep the full result)."""
    result = {k: v for k, v in result.items() if k != "id"}
    result["meta"] = {k: v for k, v in result.get("meta", {}).items() if k not in _VOLATILE_META}
    result["results"] = [
        {**r, "expectation_config": {k: v for k, v in r["expectation_config"].items() if k != "id"}} for r in result.get("results", [])
    ]
    return result


def _validate(label: str, header: dict[str, str], suites: dict, frames: dict, images, out_dir: Path) -> ValidationReport:
    """Run each suite on its frame (one GX checkpoint per suite); write the result JSON and Data Docs."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    project = Path(tempfile.mkdtemp(prefix="udaflow-gx-"))
    try:
        context = gx.get_context(mode="file", project_root_dir=project)
        context.variables.progress_bars = {"globally": False}
        datasource = context.data_sources.add_pandas("udaflow")
        results = {}
        for suite_name, expectations in suites.items():
            suite = context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=expectations))
            batch = datasource.add_dataframe_asset(suite_name).add_batch_definition_whole_dataframe("all")
            vd = context.validation_definitions.add(gx.ValidationDefinition(name=suite_name, data=batch, suite=suite))
            results[suite_name] = (vd, frames[suite_name])
        failures: list[Failure] = []
        payload: dict[str, Any] = {**header, "suites": {}}
        # a checkpoint validates one dataframe per run: one checkpoint per suite, each with its frame
        for suite_name, (vd, frame) in results.items():
            checkpoint = context.checkpoints.add(
                gx.Checkpoint(
                    name=f"{label}.{suite_name}",
                    validation_definitions=[vd],
                    actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
                    result_format={"result_format": "COMPLETE"},
                )
            )
            run = checkpoint.run(batch_parameters={"dataframe": frame})
            for vr in run.run_results.values():
                payload["suites"][suite_name] = _stable(vr.to_json_dict())
                for r in vr.results:
                    if r.success:
                        continue
                    index = (r.result or {}).get("unexpected_index_list") or []
                    index = [i for i in index if isinstance(i, int)][:5]
                    examples = frame.iloc[index].to_dict("records") if index else []
                    failures.append(Failure(suite_name, r.expectation_config.type, r.expectation_config.kwargs.get("column"), examples))
        site = project / "gx" / "uncommitted" / "data_docs" / "local_site"
        docs = out_dir / "data_docs"
        if docs.exists():
            shutil.rmtree(docs)
        if site.exists():
            shutil.copytree(site, docs)
    finally:
        shutil.rmtree(project, ignore_errors=True)
    payload["success"] = not failures
    result_json = out_dir / "gx_result.json"
    result_json.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    stats = {
        "images": int(len(images)),
        **({"source_images": int((images.role == "source").sum()), "target_images": int((images.role == "target").sum())} if "target" in header else {}),
        "expectations": sum(len(v) for v in suites.values()),
        "failed": len(failures),
        "digest": hashlib.sha256(images.sha256.str.cat().encode()).hexdigest()[:16],
    }
    return ValidationReport(not failures, failures, result_json, docs / "index.html" if docs.exists() else None, stats)
