"""The promotion gate: should `challenger` replace `champion`? Pure logic, no MLflow here.

Rule (DESIGN.md, "Evaluation and promotion"):
  1. no champion yet -> promote (first promotion);
  2. challenger is already the champion -> nothing to do;
  3. score = labelled target-holdout accuracy when both versions have it, otherwise the configured
     label-free validator (higher is better for every validator here);
  4. promote when challenger score >= champion score AND the challenger's source val accuracy has
     not dropped more than `source_tolerance` points below the champion's.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    version: str
    target_acc: float | None  # labelled target holdout accuracy, when the target has labels
    validator: float | None  # the configured label-free score of the registered weights
    source_val_acc: float | None


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    criterion: str  # "target_acc" | "validator.<name>" | "first" | "same"
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (metric, champion, challenger)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def decide(challenger: Candidate, champion: Candidate | None, validator: str, source_tolerance: float) -> Decision:
    if champion is None:
        rows = [("target_acc", "-", _fmt(challenger.target_acc)), (f"validator.{validator}", "-", _fmt(challenger.validator)),
                ("source_val_acc", "-", _fmt(challenger.source_val_acc))]
        return Decision(True, f"no champion yet: version {challenger.version} becomes the first champion", "first", rows)
    if challenger.version == champion.version:
        return Decision(False, f"version {challenger.version} is already the champion", "same")
    rows = [
        ("version", champion.version, challenger.version),
        ("target_acc", _fmt(champion.target_acc), _fmt(challenger.target_acc)),
        (f"validator.{validator}", _fmt(champion.validator), _fmt(challenger.validator)),
        ("source_val_acc", _fmt(champion.source_val_acc), _fmt(challenger.source_val_acc)),
    ]
    if challenger.target_acc is not None and champion.target_acc is not None:
        criterion, new, old = "target_acc", challenger.target_acc, champion.target_acc
    elif challenger.validator is not None and champion.validator is not None:
        criterion, new, old = f"validator.{validator}", challenger.validator, champion.validator
    else:
        return Decision(False, f"cannot compare: neither target accuracy nor validator '{validator}' is recorded on both versions", "none", rows)
    if new < old:
        return Decision(False, f"{criterion} {new:.4g} < champion's {old:.4g}", criterion, rows)
    if challenger.source_val_acc is not None and champion.source_val_acc is not None:
        drop = champion.source_val_acc - challenger.source_val_acc
        if drop > source_tolerance:
            return Decision(False, f"source val accuracy dropped {drop:.2f} points (> tolerance {source_tolerance})", criterion, rows)
    return Decision(True, f"{criterion} {new:.4g} >= champion's {old:.4g}, source val within {source_tolerance} points", criterion, rows)
