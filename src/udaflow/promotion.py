"""The promotion gate: should `challenger` replace `champion`? Pure logic, no MLflow here.

Both versions are measured at gate time on the *same* data (DESIGN.md, "Evaluation and promotion"):
the current target pool (the label-free validator, and how many classes the model still predicts)
and the source validation split; when the target domain has a labelled `val` split, accuracy on it
(never the `test` split whose accuracy is reported). Rule:

  1. challenger is already the champion -> nothing to do;
  2. a collapsed challenger is refused: its predictions on the pool must spread over the classes
     (normalised entropy of the predicted-class histogram >= `min_diversity` x its own source-only
     model's on the pool it adapted on, recorded at evaluation; x 1 for a version without that record).
     The entropy is normalised by log C over the source's C classes, so a target that holds 3 of 28 of
     them reads at most log 3 / log 28 = 0.33 for a perfect model: an absolute bar of 0.5 called every
     model of such a target collapsed. The source model's spread on the same images says, label-free,
     how many classes the pool shows. That record counts for at least two classes' worth (log 2 / log C):
     a source model that itself predicts one class shows nothing of the pool, and a bar of 0 x it
     would let a one-class challenger through;
  3. a challenger whose own record flags swapped classes is refused, unless accuracy on the target's
     labelled `val` split decides (accuracy there sees a swap itself). At evaluation the pipeline reads
     the adapted model's labels on the pool in its source-only model's features (shift.class_swaps): a
     pair of classes whose pool images each sit nearer the *other* class's source images. No label-free
     validator sees such a swap: predictions stay confident and balanced (docs/measurements.md);
  4. no champion yet (first version) -> a sanity check instead of a comparison against its own
     source-only model, both scored at evaluation: when the target has a labelled `val` split, the
     challenger's accuracy there must be at least the source-only model's; without one, its
     validator must beat the source-only model's on the pool it adapted on. Either way its source
     val accuracy may not fall more than `source_tolerance` points below that source-only model's;
  5. otherwise score = target `val` accuracy when that split exists, else the validator on the
     current pool (higher is better for every validator here); promote when challenger >= champion
     AND the challenger's source val accuracy is no more than `source_tolerance` points below the
     champion's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Measurement:
    """One registered version, measured at gate time on the gate's data."""

    version: str
    validator: float | None  # the label-free score on the current target pool
    source_val_acc: float  # accuracy (%) on the source validation split
    diversity: float  # normalised entropy of the predicted-class histogram on the pool, 0 (one class) .. 1
    target_val_acc: float | None = None  # accuracy (%) on the target's labelled `val` split, when it has one
    num_classes: int | None = None  # the C that `diversity` is normalised by (the source's classes)


@dataclass(frozen=True)
class Recorded:
    """What the pipeline recorded for a version at evaluation, on the pool it adapted on."""

    validator: float | None  # the registered (selected) weights
    source_only_validator: float | None  # its own source-only model, same pool
    source_only_source_val_acc: float | None
    target_val_acc: float | None = None  # the registered weights on the target's labelled `val` split, when it has one
    source_only_target_val_acc: float | None = None  # its source-only model on that split
    source_only_diversity: float | None = None  # its source-only model's prediction diversity on the pool
    class_swaps: tuple[tuple[str, str], ...] | None = None  # pairs of class names shift.class_swaps flagged; None = not recorded


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    criterion: str  # "target_val_acc" | "validator.<name>" | "first" | "same" | "collapse" | "class_swap"
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (metric, champion, challenger)
    data: str = ""  # which data decided, in words


def prediction_diversity(predicted: list[int] | tuple[int, ...], num_classes: int) -> float:
    """Normalised entropy of the predicted-class histogram: 1 = every class equally often, 0 = one class."""
    if num_classes < 2 or not predicted:
        return 1.0
    counts = [0] * num_classes
    for p in predicted:
        counts[int(p)] += 1
    n = len(predicted)
    entropy = -sum(c / n * math.log(c / n) for c in counts if c)
    return max(0.0, entropy / math.log(num_classes))


def two_classes_worth(num_classes: int | None) -> float:
    """The diversity of predictions split evenly over two of `num_classes` classes, log 2 / log C: the least
    spread the collapse bar is scaled by (1 for C = 2; 0 when C is unknown)."""
    return math.log(2) / math.log(num_classes) if num_classes and num_classes > 1 else 0.0


def format_swaps(swaps) -> str:
    """`[("2", "7")]` -> "2<->7"; none -> "none"."""
    return ", ".join(f"{a}<->{b}" for a, b in swaps) or "none"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def decide(
    challenger: Measurement, champion: Measurement | None, validator: str, source_tolerance: float, min_diversity: float,
    recorded: Recorded | None = None, data: str = "",
) -> Decision:
    key = f"validator.{validator}"
    if champion is not None and challenger.version == champion.version:
        return Decision(False, f"version {challenger.version} is already the champion", "same", data=data)
    rows = [
        ("version", "-" if champion is None else champion.version, challenger.version),
        *([("target_val_acc", _fmt(champion and champion.target_val_acc), _fmt(challenger.target_val_acc))] if challenger.target_val_acc is not None else []),
        (key, _fmt(champion and champion.validator), _fmt(challenger.validator)),
        ("source_val_acc", _fmt(champion and champion.source_val_acc), _fmt(challenger.source_val_acc)),
        ("prediction_diversity", _fmt(champion and champion.diversity), _fmt(challenger.diversity)),
    ]
    reference = recorded.source_only_diversity if recorded is not None and recorded.source_only_diversity is not None else None
    bar = min_diversity * (reference if reference is not None else 1.0)
    against = f"{min_diversity} x its source-only model's {reference:.3f} = {bar:.3f}" if reference is not None else f"{min_diversity}"
    if reference is not None and (two := two_classes_worth(challenger.num_classes)) > reference:
        bar = min_diversity * two
        against = (f"{min_diversity} x {two:.3f} = {bar:.3f} (two classes' worth: its source-only model's {reference:.3f} "
                   "shows fewer on the pool)")
    if challenger.diversity < bar:
        return Decision(False, f"collapsed: prediction diversity {challenger.diversity:.3f} < {against} on the target pool", "collapse", rows, data)
    swaps = recorded.class_swaps if recorded is not None else None
    if swaps is not None:
        rows.append(("class swaps at evaluation", "-", format_swaps(swaps)))
    if champion is None:  # what will decide: accuracy on the target's labelled val split sees a swap itself
        on_val = recorded is not None and recorded.target_val_acc is not None and recorded.source_only_target_val_acc is not None
    else:
        on_val = challenger.target_val_acc is not None and champion.target_val_acc is not None
    if swaps and not on_val:
        return Decision(False, f"classes look swapped: {format_swaps(swaps)} (each pair's pool images sit nearer the other class's source "
                               "images in its source-only model's features; no label-free score sees a swap, a labelled target val split would)",
                        "class_swap", rows, data)
    if champion is None:
        return _first(challenger, recorded, key, source_tolerance, rows, data)
    if challenger.target_val_acc is not None and champion.target_val_acc is not None:
        criterion, new, old = "target_val_acc", challenger.target_val_acc, champion.target_val_acc
    elif challenger.validator is not None and champion.validator is not None:
        criterion, new, old = key, challenger.validator, champion.validator
    else:
        return Decision(False, f"cannot compare: validator '{validator}' could not be computed on both versions", "none", rows, data)
    if new < old:
        return Decision(False, f"{criterion} {new:.4g} < champion's {old:.4g}", criterion, rows, data)
    drop = champion.source_val_acc - challenger.source_val_acc
    if drop > source_tolerance:
        return Decision(False, f"source val accuracy dropped {drop:.2f} points (> tolerance {source_tolerance})", criterion, rows, data)
    return Decision(True, f"{criterion} {new:.4g} >= champion's {old:.4g}, source val within {source_tolerance} points", criterion, rows, data)


def _first(challenger: Measurement, recorded: Recorded | None, key: str, source_tolerance: float, rows: list, data: str) -> Decision:
    """No champion yet: the version must do at least as well as its own source-only model (recorded at
    evaluation): on the target's labelled `val` split when it has one, else on the validator."""
    if recorded is not None and recorded.target_val_acc is not None and recorded.source_only_target_val_acc is not None:
        label, new, old, on_val = "target_val_acc", recorded.target_val_acc, recorded.source_only_target_val_acc, True
    elif recorded is not None and recorded.validator is not None and recorded.source_only_validator is not None:
        label, new, old, on_val = key, recorded.validator, recorded.source_only_validator, False
    else:
        return Decision(False, f"first version: no recorded {key} of it and of its source-only model to check it against", "first", rows, data)
    if challenger.target_val_acc is not None and not on_val:  # a val split now, none when it was evaluated
        data = f"{data}; but this first version recorded no val accuracy at its evaluation: its {key} against its source-only model's decided"
    rows = [*rows, (f"{label} at evaluation (source-only | adapted)", _fmt(old), _fmt(new)),
            ("source_val_acc (source-only | adapted)", _fmt(recorded.source_only_source_val_acc), _fmt(challenger.source_val_acc))]
    # accuracy on a small labelled split ties often: as good as the source model passes; a validator must beat it
    verb, verbs, where = ("reach", "reaches", "on the target's val split") if on_val else ("beat", "beats", "on the pool it adapted on")
    if (new < old) if on_val else (new <= old):
        return Decision(False, f"first version: {label} {new:.4g} does not {verb} its source-only model's {old:.4g} {where}", "first", rows, data)
    if recorded.source_only_source_val_acc is not None:
        drop = recorded.source_only_source_val_acc - challenger.source_val_acc
        if drop > source_tolerance:
            return Decision(False, f"first version: source val accuracy {drop:.2f} points below its source-only model's "
                                   f"(> tolerance {source_tolerance})", "first", rows, data)
    return Decision(True, f"first version: {label} {new:.4g} {verbs} its source-only model's {old:.4g} {where}, "
                          f"predictions not collapsed, source val within {source_tolerance} points: it becomes the first champion", "first", rows, data)
