"""The `pretrain` stage's output, runs/<source>-to-<target>/source_model.pt, is decided by the source
alone: a source model cached while training for one target and reused for another writes the bytes
training it for that other target writes (dvc.lock's hash of the stage does not depend on which
shift ran first)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import yaml

from udaflow import steps
from udaflow.config import load_config
from udaflow.data.domains import build_domain
from udaflow.data.ingest import ingest_folder
from udaflow.experiment import load_stage


def _digest(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_a_shift_s_source_model_has_the_same_bytes_whichever_target_trained_the_cache(tmp_path, new_shift_project):
    root = new_shift_project(tmp_path / "project", tmp_path / "scratch-b", 60)
    build_domain("synth", tmp_path / "scratch-c", seed=9, synth_size=60)
    (tmp_path / "scratch-c/synth/manifest.csv").unlink()
    ingest_folder(tmp_path / "scratch-c/synth", "fonts-c", root / "data/raw", 0.25, 0)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["source"] = "synth"
    (root / "params.yaml").write_text(yaml.safe_dump(params))

    def pretrain(target: str) -> tuple[steps.StepOutcome, Path]:
        cfg = load_config(root / "params.yaml", None, [f"target={target}"])
        return steps.pretrain(cfg), steps.run_paths(cfg).source_model

    first, _ = pretrain("fonts-b")  # trains the cache beside fonts-b's pool
    reused, copy_c = pretrain("fonts-c")
    assert reused.cached and reused.path == first.path
    cache = Path(first.path)
    cached, _, _ = load_stage(cache)
    assert cached.validator_history and cached.checkpoint_states  # the cache keeps the bench's validator study
    reused_bytes = _digest(copy_c)

    cache.unlink()
    fresh, copy_c_again = pretrain("fonts-c")  # trained beside fonts-c's own pool this time
    assert not fresh.cached and copy_c_again == copy_c
    retrained, _, _ = load_stage(Path(fresh.path))
    assert retrained.validator_history != cached.validator_history  # the two pools did score the checkpoints differently
    assert _digest(copy_c) == reused_bytes

    shift_copy, _, classes = load_stage(copy_c)
    assert all(torch.equal(shift_copy.last_state[k], retrained.last_state[k]) for k in retrained.last_state)
    assert shift_copy.loss_history == retrained.loss_history and shift_copy.steps == retrained.steps
    assert shift_copy.validator_history == [] and shift_copy.checkpoint_states == [] and shift_copy.selected_by == "last"
    assert copy_c.stat().st_size < Path(fresh.path).stat().st_size / 2  # the kept checkpoints stay in the cache only


def _pretrain_at_once(root: str, target: str, barrier) -> tuple[bool, str]:
    import torch

    torch.set_num_threads(1)
    cfg = load_config(Path(root) / "params.yaml", None, [f"target={target}"])
    barrier.wait()  # two runs of one source started together
    outcome = steps.pretrain(cfg)
    return outcome.cached, outcome.path


def test_two_shifts_of_one_source_pretrain_in_turn(tmp_path, new_shift_project, capfd):
    """Started together, two runs of one source on two targets each set the other's live pretraining
    checkpoint aside ("written by another run") and both trained the same source model from step 0.
    Now the second waits for the first, then reuses its source model."""
    import multiprocessing

    root = new_shift_project(tmp_path / "project", tmp_path / "scratch-b", 60)
    build_domain("synth", tmp_path / "scratch-c", seed=9, synth_size=60)
    (tmp_path / "scratch-c/synth/manifest.csv").unlink()
    ingest_folder(tmp_path / "scratch-c/synth", "fonts-c", root / "data/raw", 0.25, 0)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["pretrain_steps"] = 60  # long enough to overlap
    (root / "params.yaml").write_text(yaml.safe_dump(params))

    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            outcomes = pool.starmap(_pretrain_at_once, [(str(root), "fonts-b", barrier), (str(root), "fonts-c", barrier)])
    assert sorted(cached for cached, _ in outcomes) == [False, True]  # one trained it, the other reused it
    assert outcomes[0][1] == outcomes[1][1]
    cache = Path(outcomes[0][1]).parent
    assert not list(cache.glob("*.stale")) and not list(cache.glob("*.ckpt"))


def test_evaluate_runs_at_train_num_threads_as_training_did(monkeypatch):
    """A probe: with train.num_threads 1, `dvc repro`'s evaluate stage (a fresh process, torch's default threads)
    and `udaflow run`'s (after training at 1 thread) wrote metrics.json bytes apart (the MMD, at 1e-16)."""
    from udaflow.config import Config

    class Loaded(Exception):
        pass

    seen = []

    def load_data(cfg):
        seen.append(torch.get_num_threads())
        raise Loaded

    before = torch.get_num_threads()
    monkeypatch.setattr(steps, "load_data", load_data)
    cfg = Config().model_copy(update={"train": Config().train.model_copy(update={"num_threads": 1})})
    try:
        try:
            steps.evaluate(cfg)
        except Loaded:
            pass
        assert seen == [1]
    finally:
        torch.set_num_threads(before)
