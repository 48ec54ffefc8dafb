"""The training engine: bit-identical resume, atomic checkpoints, label-free selection, accuracy."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from udaflow import engine
from udaflow.data.datasets import LabelledImages
from udaflow.methods import create_method
from udaflow.models import build_classifier
from udaflow.validators import VALIDATORS, score_all

from conftest import Killed, fresh_method as _fresh  # noqa: E402


def _run(name, options, tiny_shift, cfg, ckpt, kill_at_call=None, fingerprint=None, pseudo_labels=None):
    source, target, _ = tiny_shift
    clf, method = _fresh(name, options, kill_at_call, pseudo_labels)
    return engine.train(clf, method, source, target, cfg, steps=20, lr=3e-3, seed=0, checkpoint_path=ckpt, fingerprint=fingerprint)


RESUME_CASES = [
    pytest.param("source_only", None, id="source_only"),
    pytest.param("dann", None, id="dann"),  # method parameters, BatchNorm buffers, GRL schedule
    pytest.param("cdtrans", {"refresh_every": 5}, id="cdtrans-refresh5"),  # pairs in extra_state
    # refreshes at 0, 7, 14: the resume at step 10 must keep the restored pairs, not refresh
    pytest.param("cdtrans", {"refresh_every": 7}, id="cdtrans-refresh7"),
    pytest.param("cdtrans", {"refresh_every": 5, "adversarial_weight": 1.0, "warmup_fraction": 0.3, "ema": 0.9},
                 id="cdtrans-hybrid"),  # discriminator, EMA teacher, warm-up
    # the default method: four views per draw, the pseudo-label filter's class status, an EMA teacher
    pytest.param("adamatch", {"teacher_ema": 0.9}, id="adamatch-teacher"),
]


@pytest.mark.parametrize("name, options", RESUME_CASES)
def test_resume_after_kill_is_bit_identical(name, options, tiny_shift, make_train_config, tmp_path):
    _check_resume(name, options, tiny_shift, make_train_config, tmp_path)


def test_resume_with_the_neighbour_bank_is_bit_identical(tiny_shift, make_train_config, tmp_path):
    """adamatch's neighbourhood consensus reads a memory of the whole target pool: it is checkpointed."""
    saved = _check_resume("adamatch", {}, tiny_shift, make_train_config, tmp_path, pseudo_labels={"neighbours": 3})
    bank = saved["method_extra"]["neighbour_bank"]
    assert bank["features"].shape == (len(tiny_shift[1]), 32) and bank["probs"].shape == (len(tiny_shift[1]), 3)


def _check_resume(name, options, tiny_shift, make_train_config, tmp_path, pseudo_labels=None):
    cfg = make_train_config(checkpoint_every=10, eval_every=10, deterministic=True)
    uninterrupted = _run(name, options, tiny_shift, cfg, tmp_path / "a" / "ckpt.pt", pseudo_labels=pseudo_labels)

    ckpt = tmp_path / "b" / "ckpt.pt"
    with pytest.raises(Killed):
        _run(name, options, tiny_shift, cfg, ckpt, kill_at_call=16, pseudo_labels=pseudo_labels)  # dies inside step 16
    saved = torch.load(ckpt, weights_only=False)
    assert saved["step"] == 10
    resumed = _run(name, options, tiny_shift, cfg, ckpt, pseudo_labels=pseudo_labels)

    assert resumed.resumed_from == 10
    assert uninterrupted.last_state.keys() == resumed.last_state.keys()
    for key, value in uninterrupted.last_state.items():
        assert torch.equal(value, resumed.last_state[key]), key
    assert resumed.loss_history == uninterrupted.loss_history
    assert resumed.validator_history == uninterrupted.validator_history
    assert resumed.selected_step == uninterrupted.selected_step
    for key, value in uninterrupted.selected_state.items():
        assert torch.equal(value, resumed.selected_state[key]), key
    return saved


def test_resume_of_a_finished_run_does_no_step(tiny_shift, make_train_config, tmp_path):
    cfg = make_train_config()
    ckpt = tmp_path / "ckpt.pt"
    first = _run("source_only", None, tiny_shift, cfg, ckpt)
    again = _run("source_only", None, tiny_shift, cfg, ckpt)
    # no step trained again; the images and seconds are the whole run's, as an uninterrupted run reports them
    assert again.resumed_from == 20 and again.train_images == first.train_images > 0 and again.seconds == first.seconds
    for key, value in first.last_state.items():
        assert torch.equal(value, again.last_state[key]), key


def test_checkpoint_is_written_atomically(tiny_shift, make_train_config, tmp_path, monkeypatch):
    cfg = make_train_config(checkpoint_every=10)
    ckpt = tmp_path / "run" / "ckpt.pt"
    _run("source_only", None, tiny_shift, cfg, ckpt)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt.pt"]  # no .tmp left behind
    saved = torch.load(ckpt, weights_only=False)
    assert saved["step"] == 20

    # a crash half-way through writing the next checkpoint leaves the previous one intact
    ckpt2 = tmp_path / "run2" / "ckpt.pt"
    real_save, saves = torch.save, [0]

    def crashing_save(obj, f, *args, **kwargs):
        saves[0] += 1
        if saves[0] == 2:  # the step-20 checkpoint: write some bytes, then die
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise Killed("killed while writing")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(engine.torch, "save", crashing_save)
    with pytest.raises(Killed):
        _run("source_only", None, tiny_shift, cfg, ckpt2)
    monkeypatch.setattr(engine.torch, "save", real_save)
    assert torch.load(ckpt2, weights_only=False)["step"] == 10


def test_selected_state_has_the_best_validator_score(tiny_shift, make_train_config):
    source, target, _ = tiny_shift
    cfg = make_train_config(eval_every=4)
    clf, method = _fresh("dann", None)
    result = engine.train(clf, method, source, target, cfg, steps=20, lr=3e-3, seed=0, validator="entropy")

    history = result.validator_history
    assert [h["step"] for h in history] == [4, 8, 12, 16, 20]
    for row in history:
        assert set(row) == {"step", *VALIDATORS}
    best = max(history, key=lambda h: h["entropy"])  # first maximum wins ties, like the engine
    assert result.selected_by == "entropy"
    assert result.selected_step == best["step"]

    # the selected weights really are the ones that scored best
    check = build_classifier("udaflow_vit_micro", 3)
    check.load_state_dict(result.selected_state)
    _, logits = engine.predict(check, target.images)
    assert score_all(logits)["entropy"] == pytest.approx(best["entropy"], abs=1e-5)
    if result.selected_step != 20:
        assert any(not torch.equal(result.selected_state[k], result.last_state[k]) for k in result.last_state)


def test_without_target_the_last_state_is_selected(tiny_shift, make_train_config):
    source, _, _ = tiny_shift
    clf, method = _fresh("source_only", None)
    result = engine.train(clf, method, source, None, make_train_config(), steps=10, lr=3e-3, seed=0)
    assert result.selected_by == "last" and result.selected_step == 10
    assert result.validator_history == []
    for k, v in result.last_state.items():
        assert torch.equal(v, result.selected_state[k])


def test_unknown_validator_fails_before_training(tiny_shift, make_train_config):
    source, target, _ = tiny_shift
    clf, method = _fresh("source_only", None)
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    with pytest.raises(ValueError, match="unknown validator 'nope'"):
        engine.train(clf, method, source, target, make_train_config(), steps=5, lr=3e-3, seed=0, validator="nope")
    for k, v in clf.state_dict().items():
        assert torch.equal(v, before[k])


def test_schedule_warmup_then_cosine():
    f = engine._schedule(warmup=4, total=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.5)  # half-way through the cosine part
    assert f(14) == pytest.approx(0.0, abs=1e-12)
    assert f(100) == pytest.approx(0.0, abs=1e-12)


def test_accuracy_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2, 1])
    # predictions 0, 1, 2, 0, 1 -> 3 of 5 right
    assert engine.accuracy(logits, labels) == pytest.approx(60.0)
    per_class = engine.per_class_accuracy(logits, labels, 4)
    assert per_class[0] == pytest.approx(100.0)
    assert per_class[1] == pytest.approx(200.0 / 3)
    assert per_class[2] == pytest.approx(0.0)
    assert per_class[3] is None  # no example of class 3


def test_predict_chunks_on_a_cpu_without_changing_a_bit():
    # evaluation and cdtrans's refresh embed whole domains in chunks: 128 images a chunk on a CPU keeps the
    # activations in cache; each image's features must not depend on which chunk it fell in
    torch.manual_seed(0)
    clf = build_classifier("udaflow_vit_tiny3", 10)
    for m in clf.modules():  # running statistics of a trained model, not the identity of a fresh one
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    clf.train()
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    calls = []
    hook = clf.backbone.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    features, logits = engine.predict(clf, images)
    hook.remove()
    assert calls == [128, 128, 44]  # the CPU's default chunk
    assert clf.training  # the mode is restored
    for batch_size in (512, 37):
        f, g = engine.predict(clf, images, batch_size=batch_size)
        assert torch.equal(f, features) and torch.equal(g, logits), batch_size
    assert features.shape == (300, clf.num_features) and logits.shape == (300, 10)


def test_dev_selection_uses_source_val_and_keeps_scored_checkpoints(tiny_shift, make_train_config):
    source, target, _ = tiny_shift
    val = LabelledImages(source.images[:30], source.labels[:30], source.classes, "src-val")
    clf, method = _fresh("dann", None)
    with pytest.raises(ValueError, match="source_val"):
        engine.train(clf, method, source, target, make_train_config(), steps=4, lr=3e-3, seed=0, validator="dev")
    result = engine.train(
        clf, method, source, target, make_train_config(eval_every=5), steps=15, lr=3e-3, seed=0,
        validator="dev", source_val=val, keep_checkpoints=True,
    )
    assert [h["step"] for h in result.validator_history] == [5, 10, 15]
    assert all("dev" in h for h in result.validator_history)
    best = max(result.validator_history, key=lambda h: h["dev"])
    assert result.selected_by == "dev" and result.selected_step == best["step"]
    assert [step for step, _ in result.checkpoint_states] == [5, 10, 15]
    kept = dict(result.checkpoint_states)
    for k, v in result.selected_state.items():
        assert torch.equal(v, kept[result.selected_step][k])
    # with each kept state, the target pool's logits it was scored on: what predicting them again gives
    assert len(result.checkpoint_logits) == 3
    for (step, state), logits in zip(result.checkpoint_states, result.checkpoint_logits):
        clf.load_state_dict(state)
        assert logits.shape == (len(target), 3)
        assert torch.equal(logits, engine.predict(clf, target.images)[1]), step
        assert score_all(logits)["im"] == pytest.approx(dict((h["step"], h["im"]) for h in result.validator_history)[step])


def test_warmup_checkpoints_are_scored_but_never_selected(tiny_shift, make_train_config):
    """cdtrans's warm-up trains a DANN-like model: its checkpoints enter the history, not the choice."""
    source, target, _ = tiny_shift
    options = {"refresh_every": 2, "warmup_fraction": 0.5, "adversarial_weight": 1.0, "ema": 0.9}
    clf, method = _fresh("cdtrans", options)
    assert method.selection_start(20) == 11  # steps 0-9 are warm-up; the checkpoint after step 10 is the first pair one
    assert create_method("cdtrans", build_classifier("udaflow_vit_micro", 3), {"refresh_every": 2}).selection_start(20) == 0
    result = engine.train(clf, method, source, target, make_train_config(eval_every=2), steps=20, lr=3e-3, seed=0, validator="entropy")
    assert [h["step"] for h in result.validator_history] == list(range(2, 21, 2))
    candidates = [h for h in result.validator_history if h["step"] > 10]
    best = max(candidates, key=lambda h: h["entropy"])  # first maximum wins ties, like the engine
    assert result.selected_step == best["step"] > 10
    assert result.selected_by == "entropy"


def test_progress_in_a_log_file_is_a_plain_line_every_five_percent(tiny_shift, make_train_config, capsys):
    source, target, _ = tiny_shift
    clf = build_classifier("udaflow_vit_micro", 3)
    cfg = make_train_config(progress=True)
    engine.train(clf, create_method("dann", clf), source, target, cfg, steps=40, lr=cfg.adapt_lr, seed=0, description="adapt dann")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("adapt dann:")]
    assert [line.split(":")[1].split()[0] for line in lines] == [f"{i}/40" for i in range(2, 41, 2)]
    assert "(100%)" in lines[-1] and "loss" in lines[-1] and "left" in lines[-1]


def test_step_losses_are_read_when_an_interval_closes_or_a_checkpoint_is_written(tmp_path):
    record = engine.Record()
    steps = [{"loss": torch.tensor(v), "cls": torch.tensor(v / 2)} for v in (0.25, 0.5, 2.0)]
    for losses in steps:
        record.add_losses(losses)
    assert record.loss_sums == {} and record.loss_count == 3  # unread: reading waits for the device
    record.flush()
    assert record.loss_sums == {"loss": 2.75, "cls": 1.375}
    record.add_losses(steps[0])
    engine.Checkpoint(step=4, fingerprint=None, weights={}, method_extra={}, optimiser={}, scheduler={}, rng={}, record=record).save(tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)["record"]
    assert saved["loss_sums"] == {"loss": 3.0, "cls": 1.5} and saved["loss_count"] == 4 and "_unread" not in saved
    record.close_loss_interval(4)
    assert record.loss_history == [{"step": 4, "loss": 0.75, "cls": 0.375}] and record.loss_count == 0


def test_a_checkpoint_that_cannot_be_written_names_its_file(tmp_path, monkeypatch):
    """torch's writer turned a full disk into "unexpected pos 704 vs 598" and a directory in the way into
    "open file failed", naming no file: the CLI printed a traceback. Now the error names the file, a full disk
    puts an OSError (ENOSPC, the file) in the chain for the CLI's one line, and no partial file stays."""
    import errno
    import shutil
    from collections import namedtuple

    from udaflow.errors import disk_full

    def checkpoint():
        return engine.Checkpoint(step=4, fingerprint=None, weights={"w": torch.zeros(1000)}, method_extra={}, optimiser={},
                                 scheduler={}, rng={}, record=engine.Record())

    (tmp_path / "a.pt.tmp").mkdir()
    with pytest.raises(RuntimeError, match=r"a.pt.tmp: the resume checkpoint could not be written \(Is a directory\)") as err:
        checkpoint().save(tmp_path / "a.pt")
    assert "work_dir" in err.value.hint and not (tmp_path / "a.pt").exists()
    assert err.value.__cause__.errno == errno.EISDIR and disk_full(err.value) is None

    def full(obj, f):  # torch's own words when the disk fills mid-write
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(engine.torch, "save", full)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))  # 100 bytes left, 4,000 needed
    with pytest.raises(RuntimeError, match="could not be written \\(No space left on device\\)") as err:
        checkpoint().save(tmp_path / "b.pt")
    disk = disk_full(err.value)
    assert disk is not None and disk.filename == str(tmp_path / "b.pt.tmp")
    assert not (tmp_path / "b.pt.tmp").exists() and not (tmp_path / "b.pt").exists()


def test_a_training_task_is_retried_after_a_hiccup_not_after_udaflow_said_why_it_stopped(tmp_path):
    """A failure udaflow raised on purpose (a checkpoint it cannot write, a rank that failed under torchrun) or a
    full disk fails again the same way: retried, it trained as many steps again and printed its error twice."""
    import errno

    from prefect.states import Failed

    from tasks.training import adapt_to_target, pretrain_source, worth_retrying

    assert all(t.retries == 1 and t.retry_condition_fn is worth_retrying for t in (adapt_to_target, pretrain_source))
    (tmp_path / "c.pt.tmp").mkdir()
    try:
        engine.Checkpoint(step=1, fingerprint=None, weights={}, method_extra={}, optimiser={}, scheduler={}, rng={},
                          record=engine.Record()).save(tmp_path / "c.pt")
    except RuntimeError as exc:
        ours = exc
    try:
        torch.zeros(2) @ torch.zeros(3)  # a kernel's own error, as a crashed step raises it
    except RuntimeError as exc:
        torch_s = exc
    assert not worth_retrying(None, None, Failed(data=ours))
    assert not worth_retrying(None, None, Failed(data=OSError(errno.ENOSPC, "No space left on device")))
    assert worth_retrying(None, None, Failed(data=torch_s))
    try:  # a Ctrl-C that torch's writer wrapped (a RuntimeError whose context is the KeyboardInterrupt): stopped, never retried
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("unexpected pos 46 vs 0")
    except RuntimeError as exc:
        wrapped = exc
    assert not worth_retrying(None, None, Failed(data=wrapped))
    assert worth_retrying(None, None, Failed(data=ConnectionResetError("connection reset by peer")))


def test_a_terminal_bar_reads_the_loss_at_most_twice_a_second(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock[0])
    report = engine.ProgressReport(False, "adapt", 10)
    report.bar = object()  # as on a terminal
    assert not report.wants_loss(1)
    clock[0] += 0.5
    assert report.wants_loss(2)
    report.bar = type("Bar", (), {"update": lambda self, *a, **k: None})()
    report.task = 0
    report.update(2, 1.0)
    assert not report.wants_loss(3) and report.wants_loss(10)  # the last step always shows it


def test_rotate_quarters_by_hand():
    from udaflow.auxiliary import rotate_quarters

    x = torch.arange(4.0).reshape(1, 1, 2, 2).repeat(4, 1, 1, 1)  # [[0, 1], [2, 3]]
    out = rotate_quarters(x, torch.tensor([0, 1, 2, 3]))
    assert out[0, 0].tolist() == [[0, 1], [2, 3]]
    assert out[1, 0].tolist() == [[1, 3], [0, 2]]  # 90 degrees counter-clockwise
    assert out[2, 0].tolist() == [[3, 2], [1, 0]]
    assert out[3, 0].tolist() == [[2, 0], [3, 1]]


def test_rotation_task_switches_on_for_adaptation_only(tiny_shift, make_train_config, tmp_path):
    source, target, _ = tiny_shift

    def run(weight, auxiliary=True, checkpoint=None, steps=20, **extra):
        torch.manual_seed(0)
        clf = build_classifier("udaflow_vit_micro", 3)
        cfg = make_train_config(rotation_weight=weight, **extra)
        return engine.train(clf, create_method("dann", clf), source, target, cfg, steps=steps, lr=cfg.adapt_lr, seed=0,
                            auxiliary=auxiliary, checkpoint_path=checkpoint)

    off, on = run(0.0), run(0.5)
    assert "rotation" not in off.loss_history[0] and "rotation" in on.loss_history[-1]
    assert 0.0 < on.loss_history[-1]["rotation"] < 3.0
    assert on.train_images == off.train_images * 3 // 2  # B extra target images a step
    half = run(0.5, rotation_batch=make_train_config().batch_size // 2)
    assert half.train_images == off.train_images * 5 // 4  # train.rotation_batch: B/2 extra
    assert half.loss_history[-1]["loss"] != on.loss_history[-1]["loss"]
    both = run(0.5, rotation_source=0.5)  # half the rotation batch from the source, as Sun et al. (2019)
    assert both.train_images == on.train_images and both.loss_history[-1]["rotation"] != on.loss_history[-1]["rotation"]
    changed = [k for k in off.last_state if not torch.equal(off.last_state[k], on.last_state[k])]
    assert changed  # the auxiliary gradient reaches the shared features
    # pretraining (auxiliary=False) ignores the weight: bit-identical to the task switched off
    plain = run(0.5, auxiliary=False)
    assert all(torch.equal(plain.last_state[k], off.last_state[k]) for k in off.last_state)
    # the rotation head is part of the checkpoint: killed in step 16 and resumed, it ends where an uninterrupted run does
    cfg = make_train_config(rotation_weight=0.5, checkpoint_every=10)
    ckpt = tmp_path / "ckpt.pt"
    for kill_at_call in (16, None):
        clf, method = _fresh("dann", None, kill_at_call)
        try:
            resumed = engine.train(clf, method, source, target, cfg, steps=20, lr=cfg.adapt_lr, seed=0, auxiliary=True, checkpoint_path=ckpt)
        except Killed:
            assert torch.load(ckpt, weights_only=False)["step"] == 10
    clf, method = _fresh("dann", None)
    uninterrupted = engine.train(clf, method, source, target, cfg, steps=20, lr=cfg.adapt_lr, seed=0, auxiliary=True)
    assert resumed.resumed_from == 10 and resumed.loss_history == uninterrupted.loss_history
    assert all(torch.equal(resumed.last_state[k], uninterrupted.last_state[k]) for k in uninterrupted.last_state)


def test_a_checkpoint_of_another_run_is_never_continued(tiny_shift, make_train_config, tmp_path, capsys):
    cfg = make_train_config(checkpoint_every=10)
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(Killed):
        _run("source_only", None, tiny_shift, cfg, ckpt, kill_at_call=16, fingerprint="run-a")
    assert torch.load(ckpt, weights_only=True)["fingerprint"] == "run-a"
    capsys.readouterr()
    other = _run("source_only", None, tiny_shift, cfg, ckpt, fingerprint="run-b")  # other params / data / code
    assert other.resumed_from == 0
    assert "was written by another run" in capsys.readouterr().err
    assert (tmp_path / "ckpt.stale").exists()
    fresh = _run("source_only", None, tiny_shift, cfg, tmp_path / "fresh.pt", fingerprint="run-b")
    for key, value in fresh.last_state.items():
        assert torch.equal(value, other.last_state[key]), key  # exactly a fresh run

    # the same fingerprint resumes, and says from where
    ckpt2 = tmp_path / "ckpt2.pt"
    with pytest.raises(Killed):
        _run("source_only", None, tiny_shift, cfg, ckpt2, kill_at_call=16, fingerprint="run-a")
    again = _run("source_only", None, tiny_shift, cfg, ckpt2, fingerprint="run-a")
    assert again.resumed_from == 10
    assert f"resuming from step 10 ({ckpt2})" in capsys.readouterr().err


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


def test_a_pickle_payload_in_a_checkpoint_is_refused_not_run(tiny_shift, make_train_config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"step": 10, "fingerprint": None, "classifier": _Payload()}, ckpt)
    result = _run("source_only", None, tiny_shift, make_train_config(), ckpt)
    assert result.resumed_from == 0
    assert not (tmp_path / "PWNED").exists()
    assert "not a readable udaflow checkpoint" in capsys.readouterr().err


def test_resume_inside_a_loss_interval_with_kept_checkpoints_is_bit_identical(tiny_shift, make_train_config, tmp_path):
    """Resume points that are not evaluation points: the open interval's loss sums and the kept
    checkpoints (the pretraining cache keeps them for the validator study) travel in the checkpoint."""
    source, target, _ = tiny_shift
    val = LabelledImages(source.images[:30], source.labels[:30], source.classes, "src-val")
    cfg = make_train_config(checkpoint_every=6, eval_every=5)

    def run(ckpt, kill_at_call=None):
        clf, method = _fresh("dann", None, kill_at_call)
        return engine.train(clf, method, source, target, cfg, steps=20, lr=3e-3, seed=0, checkpoint_path=ckpt,
                            source_val=val, validator="dev", keep_checkpoints=True)

    uninterrupted = run(None)
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(Killed):
        run(ckpt, kill_at_call=16)  # last resume point: step 12, two steps into the interval (10, 15]
    resumed = run(ckpt)
    assert resumed.resumed_from == 12
    assert resumed.loss_history == uninterrupted.loss_history
    assert resumed.validator_history == uninterrupted.validator_history
    assert [s for s, _ in resumed.checkpoint_states] == [s for s, _ in uninterrupted.checkpoint_states] == [5, 10, 15, 20]
    for (_, a), (_, b) in zip(uninterrupted.checkpoint_states, resumed.checkpoint_states):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(resumed.checkpoint_logits) == 4
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted.checkpoint_logits, resumed.checkpoint_logits))
    assert resumed.selected_step == uninterrupted.selected_step
    assert all(torch.equal(v, resumed.last_state[k]) for k, v in uninterrupted.last_state.items())


def test_a_checkpoint_is_one_file_of_tensors_and_plain_values(tiny_shift, make_train_config, tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(Killed):
        _run("cdtrans", {"refresh_every": 5}, tiny_shift, make_train_config(checkpoint_every=10), ckpt, kill_at_call=16, fingerprint="run-a")
    saved = torch.load(ckpt, weights_only=True)  # no pickled objects: nothing in it can run code
    assert saved["format"] == engine.Checkpoint.FORMAT and saved["step"] == 10 and saved["fingerprint"] == "run-a"
    back = engine.Checkpoint.load(ckpt, "run-a", "adapt")
    assert back.step == 10 and set(back.weights) == {"classifier", "method"}
    assert [row["step"] for row in back.record.loss_history] == [10]
    assert back.method_extra["pairs"] is not None  # the method's own state (cdtrans's pairs) is in it
    assert "adapt: resuming from step 10" in capsys.readouterr().err


@pytest.mark.parametrize("content, needle", [
    # what udaflow wrote before checkpoints had a format: a loose dict with the same fingerprint
    ({"step": 10, "fingerprint": None, "classifier": {}, "optimiser": {}, "best_score": 0.0}, "was written by an older udaflow"),
    ([1, 2, 3], "was written by an older udaflow"),
    ({"format": engine.Checkpoint.FORMAT, "step": 10, "fingerprint": None}, "is not a readable udaflow checkpoint (KeyError)"),
    (b"PK\x03\x04 truncated", "is not a readable udaflow checkpoint"),
])
def test_an_unusable_checkpoint_is_set_aside_never_a_crash(tiny_shift, make_train_config, tmp_path, capsys, content, needle):
    ckpt = tmp_path / "ckpt.pt"
    if isinstance(content, bytes):
        ckpt.write_bytes(content)
    else:
        torch.save(content, ckpt)
    result = _run("source_only", None, tiny_shift, make_train_config(), ckpt)
    assert result.resumed_from == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if str(ckpt) in line]
    assert len(lines) == 1 and needle in lines[0] and lines[0].endswith("starting fresh"), lines
    assert (tmp_path / "ckpt.stale").exists()
    fresh = _run("source_only", None, tiny_shift, make_train_config(), None)
    assert all(torch.equal(v, result.last_state[k]) for k, v in fresh.last_state.items())  # exactly a fresh run


def test_run_fingerprint_covers_params_data_and_start_weights(tiny_shift):
    from udaflow.config import Config
    from udaflow.data.datasets import UnlabelledImages
    from udaflow.experiment import run_fingerprint

    source, target, _ = tiny_shift
    cfg = Config()
    clf, _ = _fresh("source_only", None)
    base = run_fingerprint(cfg, "dann", clf, source, target)
    assert base == run_fingerprint(cfg, "dann", clf, source, target)
    assert base == run_fingerprint(cfg.model_copy(update={"train": cfg.train.model_copy(update={"progress": False})}), "dann", clf, source, target)
    changed = {
        "param": run_fingerprint(cfg.model_copy(update={"seed": 1}), "dann", clf, source, target),
        "method": run_fingerprint(cfg, "cdan", clf, source, target),
        "data": run_fingerprint(cfg, "dann", clf, source, UnlabelledImages(target.images.flip(0), target.domain)),
    }
    with torch.no_grad():
        next(clf.parameters()).add_(1.0)
    changed["weights"] = run_fingerprint(cfg, "dann", clf, source, target)
    for what, value in changed.items():
        assert value != base, what


def test_the_pretraining_fingerprint_covers_what_the_source_model_depends_on_only(tiny_shift):
    """A run killed while pretraining and started again with another adapt_steps said the checkpoint
    "was written by another run" and pretrained from step 0, though the source model is the same."""
    from udaflow.config import Config
    from udaflow.data.datasets import ShiftData, UnlabelledImages
    from udaflow.experiment import source_fingerprint

    source, target, labels = tiny_shift
    shift = ShiftData(source, source, target, LabelledImages(target.images, labels, source.classes, "tgt"), "transductive")
    cfg = Config()
    clf, _ = _fresh("source_only", None)
    base = source_fingerprint(cfg, clf, shift)

    def with_(**train):
        return cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})

    same = {
        "adapt_steps": with_(adapt_steps=cfg.train.adapt_steps + 500), "adapt_lr": with_(adapt_lr=1e-4),
        "rotation_weight": with_(rotation_weight=0.0), "method": cfg.model_copy(update={"method": "dann"}),
        "checkpoint_every": with_(checkpoint_every=50),
    }
    for what, other in same.items():
        assert source_fingerprint(other, clf, shift) == base, what
    changed = {
        "pretrain_steps": with_(pretrain_steps=cfg.train.pretrain_steps + 1), "lr": with_(lr=1e-4), "seed": cfg.model_copy(update={"seed": 1}),
        "validator": cfg.model_copy(update={"validator": "entropy"}),  # it keeps the pick
    }
    for what, other in changed.items():
        assert source_fingerprint(other, clf, shift) != base, what
    pool = dataclasses.replace(shift, target_adapt=UnlabelledImages(target.images.flip(0), target.domain))
    assert source_fingerprint(cfg, clf, pool) != base  # the pool scores its checkpoints


def test_stage_files_hold_no_pickled_objects(tmp_path, monkeypatch):
    from udaflow.experiment import load_stage, save_stage

    monkeypatch.chdir(tmp_path)
    result = engine.TrainResult({"w": torch.ones(2)}, {"w": torch.zeros(2)}, 3, "im", [{"step": 1.0, "im": 0.5}], [{"loss": 1.0}],
                                10, 5.0, 100, "cpu", extra={"selectable_from": 0}, checkpoint_states=[(5, {"w": torch.ones(1)})],
                                checkpoint_logits=[torch.zeros(4, 2)])
    save_stage(tmp_path / "stage.pt", result, 7.0, ("0", "1"))
    torch.load(tmp_path / "stage.pt", weights_only=True)  # tensors and plain containers only
    back, wall, classes = load_stage(tmp_path / "stage.pt")
    assert (back.seconds, wall, classes, back.selected_step) == (5.0, 7.0, ("0", "1"), 3)
    assert back.checkpoint_states[0][0] == 5 and torch.equal(back.checkpoint_states[0][1]["w"], torch.ones(1))
    assert back.checkpoint_logits == []  # the scoring target's, not the stage's: a cached source model serves every target

    torch.save({"result": _Payload(), "classes": ["0"]}, tmp_path / "evil.pt")  # e.g. pulled from a DVC remote
    with pytest.raises(ValueError, match="evil.pt: not a udaflow stage file"):
        load_stage(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()


def test_source_cache_key_covers_what_changes_the_bits(tmp_path, monkeypatch):
    from udaflow import experiment
    from udaflow.config import Config
    from udaflow.data.manifest import MANIFEST_NAME
    from udaflow.experiment import source_cache_key

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / MANIFEST_NAME).write_text("path,label\n")
    cfg = Config().model_copy(update={"data": Config().data.model_copy(update={"root": tmp_path})})
    base = source_cache_key(cfg, "src", 10)

    def with_train(**kw):
        return source_cache_key(cfg.model_copy(update={"train": cfg.train.model_copy(update=kw)}), "src", 10)

    for changed in ({"num_threads": 1}, {"device": "cuda"}, {"amp": False}, {"eval_every": 7}, {"lr": 1e-4}):
        assert with_train(**changed) != base, changed
    for same in ({"adapt_steps": 1}, {"adapt_lr": 1e-4}, {"progress": False}, {"checkpoint_every": 7}, {"rotation_weight": 0.5}):
        assert with_train(**same) == base, same
    # the strong view's warp is adaptation's alone; the default view's augmentation is pretraining's
    augment = cfg.train.augment
    assert with_train(augment=augment.model_copy(update={"strong_rotate": 15.0, "strong_shear": 0.3})) == base
    assert with_train(augment=augment.model_copy(update={"invert": 0.0})) != base

    # a weights file: its bytes, not only its path (other weights saved under the same name train another model)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"first")

    def with_weights():
        return source_cache_key(cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": str(weights)})}), "src", 10)

    first = with_weights()
    assert first != base and with_weights() == first
    weights.write_bytes(b"other")
    os.utime(weights, ns=(1, 1))  # a new mtime, as any rewrite has
    assert with_weights() != first

    # udaflow's code: `dvc repro` re-runs pretraining after a code change and must not read the old code's model
    assert experiment.code_digest() == experiment.code_digest.__wrapped__() and len(experiment.code_digest()) == 64
    monkeypatch.setattr(experiment, "code_digest", lambda: "0" * 64)
    assert source_cache_key(cfg, "src", 10) != base


@pytest.mark.slow
def test_a_compiled_backbone_trains_like_the_eager_one(tiny_shift, make_train_config):
    source, target, _ = tiny_shift
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        clf = build_classifier("udaflow_vit_micro", 3)
        cfg = make_train_config(compile=compiled)
        results.append(engine.train(clf, create_method("dann", clf), source, target, cfg, steps=4, lr=cfg.adapt_lr, seed=0))
    eager, compiled = results
    assert eager.last_state.keys() == compiled.last_state.keys()  # compiled in place: the same checkpoint keys
    assert all(torch.allclose(eager.last_state[k].float(), compiled.last_state[k].float(), atol=1e-4) for k in eager.last_state)


def test_the_oracle_trains_with_the_rotation_task_on_its_own_target_train_images(tiny_shift, make_train_config, monkeypatch):
    """The oracle gets the adaptation methods' recipe (the rotation task included), and its unlabelled
    pool (rotation task, checkpoint choice) is the labelled target-train split itself: no test image."""
    from types import SimpleNamespace

    from udaflow import experiment
    from udaflow.config import Config, ModelConfig
    from udaflow.data.datasets import UnlabelledImages

    labelled, _, _ = tiny_shift  # stands in for labelled target-train
    pools = []

    def spy(classifier, method, source, target, cfg, **kwargs):
        pools.append(target)
        return engine.train(classifier, method, source, target, cfg, **kwargs)

    monkeypatch.setattr(experiment, "train", spy)

    def run(weight):
        cfg = Config(model=ModelConfig(backbone="udaflow_vit_micro"), train=make_train_config(rotation_weight=weight, adapt_steps=20))
        torch.manual_seed(0)
        start = build_classifier("udaflow_vit_micro", 3).state_dict()
        return experiment.train_oracle(cfg, SimpleNamespace(train=SimpleNamespace(last_state=start)), labelled).train

    on, off = run(0.5), run(0.0)
    assert "rotation" in on.loss_history[-1] and "rotation" not in off.loss_history[-1]
    assert 0.0 < on.loss_history[-1]["rotation"] < 3.0
    assert on.train_images == 2 * off.train_images == 20 * 2 * 16  # B labelled + B rotated images a step
    assert all(isinstance(pool, UnlabelledImages) and pool.images is labelled.images for pool in pools)


def test_class_order_is_one_order_in_every_process():
    """"1" and "01" are equal as numbers: sorting the set of class names by a key with ties followed the
    set's order, which is the per-process string hash's, so one process's class 0 was another's class 1."""
    import os
    import subprocess
    import sys

    names = "{'1', '01', '2', '02', '007', '7', 'b', 'a', '\\u00b2', '10'}"
    code = f"from udaflow.data.datasets import _class_key; print(sorted({names}, key=_class_key))"
    orders = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(6)}
    assert orders == {"['01', '1', '02', '2', '007', '7', '10', 'a', 'b', '²']\n"}, orders  # '²' is a digit int() refuses


def test_a_cached_source_model_of_other_class_order_is_trained_again(tmp_path, tiny_shift, make_train_config, monkeypatch, capsys):
    """The source cache's key counts the classes, not their order: a stage whose output units mean other
    classes is never handed on, whatever its key says."""
    from types import SimpleNamespace

    from udaflow import experiment
    from udaflow.config import Config, ModelConfig
    from udaflow.data.manifest import MANIFEST_NAME

    source, target, _ = tiny_shift
    (tmp_path / "data/src").mkdir(parents=True)
    (tmp_path / "data/src" / MANIFEST_NAME).write_text("path,label\n")
    cfg = Config(model=ModelConfig(backbone="udaflow_vit_micro"), train=make_train_config(pretrain_steps=4), work_dir=tmp_path / "runs")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": tmp_path / "data"})})
    val = LabelledImages(source.images[:12], source.labels[:12], source.classes, "src-val")
    data = SimpleNamespace(classes=source.classes, source_train=source, target_adapt=target, source_val=val)
    trained = []
    real_train = experiment.train
    monkeypatch.setattr(experiment, "train", lambda *a, **kw: trained.append(1) or real_train(*a, **kw))

    first = experiment.pretrain_source(cfg, data, "src")
    assert trained == [1] and not first.cached
    assert experiment.pretrain_source(cfg, data, "src").cached and trained == [1]  # the same classes: reused
    [cache] = (tmp_path / "runs/cache").glob("source-src-*.pt")
    result, wall, classes = experiment.load_stage(cache)
    experiment.save_stage(cache, result, wall, tuple(reversed(classes)))
    again = experiment.pretrain_source(cfg, data, "src")
    assert trained == [1, 1] and not again.cached
    assert "are not the source's" in capsys.readouterr().err
    assert experiment.load_stage(cache)[2] == tuple(source.classes)


def test_a_cpu_training_loop_skips_the_nan_fill_of_new_tensors_and_keeps_its_bits(tiny_shift, make_train_config, monkeypatch):
    """engine._cpu_allocation: inside the CPU loop torch's deterministic mode no longer fills every new
    tensor (its flag is restored afterwards), and the trained weights are those of a loop that fills."""
    import contextlib

    import torch.utils.deterministic as deterministic

    source, target, _ = tiny_shift
    cfg = make_train_config()

    def run():
        clf, method = _fresh("adamatch", None)
        forward, seen = method.forward, []

        def spying_forward(*args, **kwargs):
            seen.append(deterministic.fill_uninitialized_memory)
            return forward(*args, **kwargs)

        method.forward = spying_forward
        result = engine.train(clf, method, source, target, cfg, steps=8, lr=3e-3, seed=0)
        return result, seen

    assert deterministic.fill_uninitialized_memory  # torch's default under use_deterministic_algorithms
    kept, seen = run()
    assert seen == [False] * 8 and deterministic.fill_uninitialized_memory
    monkeypatch.setattr(engine, "_cpu_allocation", lambda device: contextlib.nullcontext())
    filled, seen = run()
    assert seen == [True] * 8
    assert kept.last_state.keys() == filled.last_state.keys()
    assert all(torch.equal(kept.last_state[k], filled.last_state[k]) for k in kept.last_state)


def test_the_optimiser_updates_every_tensor_at_once_with_the_loops_bits(tiny_shift, make_train_config, monkeypatch):
    """AdamW runs torch's foreach implementation (one kernel per update over all tensors; torch's CPU default is a
    Python loop over them): the weights the loop would give, to the bit."""
    source, target, _ = tiny_shift
    real, made = torch.optim.AdamW, []

    def adamw(*args, **kwargs):
        made.append(kwargs.get("foreach"))
        return real(*args, **kwargs)

    def run():
        clf, method = _fresh("adamatch", None)
        return engine.train(clf, method, source, target, make_train_config(), steps=8, lr=3e-3, seed=0).last_state

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    at_once = run()
    assert made == [True]
    monkeypatch.setattr(torch.optim, "AdamW", lambda *args, **kwargs: real(*args, **{**kwargs, "foreach": False}))
    looped = run()
    assert all(torch.equal(at_once[k], looped[k]) for k in looped)


def test_a_bench_workers_resume_and_progress_lines_carry_its_cell_tag(monkeypatch, capsys):
    """In a `--jobs 2` bench two cells share the terminal: 'pretrain shopb: resuming from step 20 (...)' came
    untagged among '[shopb:shopa seed 0] pretrain shopb: resumed at step 20/60' lines."""
    from udaflow import engine as eng

    monkeypatch.setattr(eng, "_PLAIN_PROGRESS", "[synth:mnist seed 0] ")
    eng._say("pretrain synth: resuming from step 20 (runs/cache/source-synth-x.ckpt)")
    with eng.ProgressReport(True, "pretrain synth", total=40, completed=20) as report:
        report.update(40, 0.5)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[synth:mnist seed 0] pretrain synth: resuming from step 20 (runs/cache/source-synth-x.ckpt)"
    assert lines[1] == "[synth:mnist seed 0] pretrain synth: resumed at step 20/40"
    assert lines[2].startswith("[synth:mnist seed 0] pretrain synth: 40/40 steps (100%), loss 0.500")
