"""The benchmark's selection report and cost figures on known inputs."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from udaflow import engine
from udaflow.bench import checkpoint_study, mean_regret, selection_report
from udaflow.costs import training_gflop_per_image
from udaflow.data.datasets import LabelledImages, ShiftData
from udaflow.experiment import StageResult
from udaflow.methods import create_method
from udaflow.models import build_classifier


def _checkpoint(step, acc, im, ensv, selectable=True):
    return {"step": step, "target_acc": acc, "scores": {"im": im, "ensv": ensv}, "selectable": selectable}


def test_regret_and_median_of_the_last_five():
    checkpoints = [
        _checkpoint(100, 95.0, 9.0, 50.0, selectable=False),  # a warm-up checkpoint: the best, but never selectable
        _checkpoint(200, 80.0, 1.0, 60.0),
        _checkpoint(300, 90.0, 2.0, 99.0),
        _checkpoint(400, 85.0, 3.0, 70.0),
        _checkpoint(500, 70.0, 0.5, 65.0),
        _checkpoint(600, 75.0, 0.1, 80.0),
    ]
    report = selection_report(checkpoints)
    # best selectable is 90 (step 300); im picks step 400 (85), ensv picks step 300 (90)
    assert report["regret"] == {"im": 5.0, "ensv": 0.0}
    assert report["median_last5_target_acc"] == 80.0  # steps 200..600: 80 90 85 70 75
    rows = [{"shift": "a:b", "regret": {"im": 5.0, "ensv": 0.0}}, {"shift": "a:b", "regret": {"im": 1.0, "ensv": 2.0}}, {"shift": "c:d"}]
    assert mean_regret(rows, "a:b") == {"ensv": 1.0, "im": 3.0}


def test_training_flops_per_image_scale_with_width():
    small = training_gflop_per_image(build_classifier("udaflow_vit_micro", 10), 32)
    tiny = training_gflop_per_image(build_classifier("udaflow_vit_tiny", 10), 32)
    tiny2 = training_gflop_per_image(build_classifier("udaflow_vit_tiny2", 10), 32)
    assert 0 < small < tiny < tiny2
    assert tiny == pytest.approx(0.0416, rel=0.01)  # forward + backward at 32 px, the default until 2026-12-01
    assert tiny2 == pytest.approx(0.0425, rel=0.01)  # a wider stem for one block fewer, ~the same FLOPs (tiny3: + SeqPool)


def test_counting_flops_leaves_the_model_as_it_was():
    clf = build_classifier("udaflow_vit_tiny3", 10).eval()
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    assert training_gflop_per_image(clf, 32) > 0
    assert not clf.training and all(p.grad is None for p in clf.parameters())
    for key, value in clf.state_dict().items():  # the stem's BatchNorm statistics too: no train-mode forward on it
        assert torch.equal(value, before[key]), key


def test_machine_names_the_cpu_and_the_kernels_and_differences_are_named_only_where_known(monkeypatch, tmp_path):
    from udaflow import costs
    from udaflow.steps import machine_differences

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                       "model name\t: AMD EPYC   9R14 96-Core Processor\n\nprocessor\t: 1\nmodel name\t: other\n")
    real_path = costs.Path
    monkeypatch.setattr(costs, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    assert costs.cpu_name() == "AMD EPYC 9R14 96-Core Processor (AuthenticAMD, family 25, model 17)"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n\n")  # an ARM (Neoverse N1)
    import platform

    assert costs.cpu_name() == f"{platform.machine()} (implementer 0x41, part 0xd0c)"
    cpuinfo.write_bytes(b"model name\t: \xff\xfe")  # not text: what platform knows
    assert costs.cpu_name() == (platform.processor() or platform.machine())
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                       "model name\t: AMD EPYC   9R14 96-Core Processor\n")
    here = costs.machine("cpu")
    assert here == {"hardware.cpu": costs.cpu_name(), "hardware.cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "hardware.gpu": "none"}

    recorded = {"hardware.cpu": "Intel(R) Xeon(R) Processor (GenuineIntel, family 6, model 167)", "hardware.cpu_capability": "AVX512",
                "hardware.gpu": "none", "version.torch": "2.14.1", "git.commit": "abc"}
    now = {**recorded, "hardware.cpu": here["hardware.cpu"], "git.commit": "def"}
    assert machine_differences(recorded, now) == [f"CPU: {recorded['hardware.cpu']} -> {here['hardware.cpu']}"]
    assert machine_differences(recorded, {**recorded, "version.torch": "2.15.0"}) == ["torch: 2.14.1 -> 2.15.0"]
    assert machine_differences(recorded, recorded) == []
    assert machine_differences({"version.torch": "2.14.1"}, now) == []  # a run from before the hardware tags: nothing to say


@pytest.mark.parametrize("groups", [1, 4, 48])
def test_a_grouped_convolution_counts_its_own_flops_not_a_dense_ones(groups):
    """A stride-2 3x3 conv, 48 -> 48 channels, on 8 images of 16x16 (8x8 out): forward 2 x 8 x 64 x 48 x (48 / g) x 9
    FLOPs; its backward (input and weight gradients) twice that. torch 2.14's formula counts a grouped
    conv's weight gradient as a dense one's (a depthwise one's backward 24.5x here), which the bench must not report."""
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 48, 1), torch.nn.Conv2d(48, 48, 3, 2, 1, groups=groups, bias=False))
    forward = 2 * 8 * 64 * 48 * (48 // groups) * 9
    first = 2 * 8 * 256 * 48 * 3  # the 1x1 conv in front: forward + weight gradient (its input needs none)
    assert training_gflop_per_image(conv, 16) * 8 * 1e9 == pytest.approx(3 * forward + 2 * first)
    if groups == 1:  # dense: the same count as torch's own formula
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as torch_count:
            conv(torch.randn(8, 3, 16, 16)).sum().backward()
        assert torch_count.get_total_flops() == pytest.approx(3 * forward + 2 * first)


def test_seed_summary_is_mean_and_sample_std_per_cell():
    from udaflow.bench import summarise

    rows = [
        {"shift": "a:b", "method": "dann", "seed": 0, "target_acc_last": 90.0, "seconds": 10.0},
        {"shift": "a:b", "method": "dann", "seed": 1, "target_acc_last": 92.0, "seconds": 12.0},
        {"shift": "a:b", "method": "dann", "seed": 2, "target_acc_last": 94.0, "seconds": 11.0},
        {"shift": "a:b", "method": "mcc", "seed": 0, "target_acc_last": 80.0, "seconds": 9.0},
    ]
    dann, mcc = summarise(rows)
    assert dann["seeds"] == 3 and dann["target_acc_last"] == {"mean": 92.0, "std": 2.0} and dann["seconds"]["mean"] == 11.0
    assert mcc["target_acc_last"] == {"mean": 80.0, "std": 0.0} and "median_last5_target_acc" not in mcc


def test_the_validator_study_reads_the_logits_training_scored_and_predicts_only_what_it_lacks(tiny_shift, make_train_config, monkeypatch):
    """The bench's study of every kept checkpoint: the pool's logits come from training's own scoring
    (no second pass over the pool); in the transductive protocol (pool = scored set) accuracy reads them
    too. Without them (a cached source model), or with another scored set, it predicts: same rows."""
    source, target, labels = tiny_shift
    torch.manual_seed(0)
    clf = build_classifier("udaflow_vit_micro", 3)
    result = engine.train(clf, create_method("dann", clf, None), source, target, make_train_config(eval_every=5), steps=15,
                          lr=3e-3, seed=0, keep_checkpoints=True)
    stage = StageResult(clf, result, 1.0)
    cfg = SimpleNamespace(train=SimpleNamespace(device="cpu", amp=True))
    val = LabelledImages(source.images[:10], source.labels[:10], source.classes, "src-val")
    transductive = ShiftData(source, val, target, LabelledImages(target.images, labels, source.classes, "tgt"), "transductive")
    holdout = dataclasses.replace(transductive, target_eval=LabelledImages(target.images[:20], labels[:20], source.classes, "tgt"))

    passes = []
    real_predict = engine.predict
    monkeypatch.setattr(engine, "predict", lambda model, images, *a, **k: passes.append(len(images)) or real_predict(model, images, *a, **k))
    stored = checkpoint_study(cfg, stage, transductive)
    assert passes == []  # nothing predicted again
    expected = []
    for step, state in result.checkpoint_states:
        clf.load_state_dict(state)
        expected.append((step, engine.accuracy(real_predict(clf, target.images)[1], labels)))
    assert [(c["step"], c["target_acc"]) for c in stored] == expected
    assert len({c["target_acc"] for c in stored}) > 1 and all("ensv" in c["scores"] for c in stored)

    uncached = StageResult(clf, dataclasses.replace(result, checkpoint_logits=[]), 1.0)
    assert checkpoint_study(cfg, uncached, transductive) == stored  # one pass over the pool per checkpoint
    assert passes == [len(target)] * 3

    passes.clear()
    held = checkpoint_study(cfg, stage, holdout)
    assert passes == [20] * 3  # only the scored set, the pool's logits stored
    assert [c["scores"] for c in held] == [c["scores"] for c in stored]
    for c, (step, state) in zip(held, result.checkpoint_states):
        clf.load_state_dict(state)
        assert c["target_acc"] == engine.accuracy(real_predict(clf, target.images[:20])[1], labels[:20])


def test_a_cached_source_model_on_the_pool_it_was_scored_on_is_not_predicted_again(tmp_path, tiny_shift, make_train_config, monkeypatch):
    """A bench's source-only cell reads the source model its workers just cached: `rescore_on_pool` then takes the
    pool logits pretraining kept beside the cache (`.pool`), when the pool, source val, validator and autocast are
    the ones it was scored with: what predicting the pool with every checkpoint again gives, with no pass.
    Another pool, or the sidecar gone, is predicted."""
    from conftest import CLASSES, colour_images

    from udaflow import experiment
    from udaflow.config import Config, ModelConfig
    from udaflow.data.datasets import UnlabelledImages
    from udaflow.data.manifest import MANIFEST_NAME

    source, target, labels = tiny_shift
    (tmp_path / "data/src").mkdir(parents=True)
    (tmp_path / "data/src" / MANIFEST_NAME).write_text("path,label\n")
    cfg = Config(model=ModelConfig(backbone="udaflow_vit_micro"), train=make_train_config(pretrain_steps=15, eval_every=5), work_dir=tmp_path / "runs")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": tmp_path / "data"})})
    val = LabelledImages(source.images[:12], source.labels[:12], source.classes, "src-val")
    data = ShiftData(source, val, target, LabelledImages(target.images, labels, CLASSES, "tgt"), "transductive")
    assert not experiment.pretrain_source(cfg, data, "src").cached
    cached = experiment.pretrain_source(cfg, data, "src")
    assert cached.cached and cached.train.checkpoint_logits == []  # a stage file leaves them out
    passes = []
    real_predict = experiment.predict
    monkeypatch.setattr(experiment, "predict", lambda model, images, *a, **k: passes.append(len(images)) or real_predict(model, images, *a, **k))

    read = experiment.rescore_on_pool(cfg, cached, data)
    assert passes == []
    predicted = experiment.rescore_on_pool(cfg, dataclasses.replace(cached, info={}), data)  # no sidecar known: every checkpoint predicted
    assert passes == [len(target), len(val)] * 3
    assert read.train.validator_history == predicted.train.validator_history and read.train.selected_step == predicted.train.selected_step
    assert len(read.train.checkpoint_logits) == 3 and all(torch.equal(a, b) for a, b in zip(read.train.checkpoint_logits, predicted.train.checkpoint_logits))

    xb, labels_b = colour_images(60, seed=2, shift=-30.0)
    passes.clear()
    experiment.rescore_on_pool(cfg, cached, dataclasses.replace(data, target_adapt=UnlabelledImages(xb, "tgt-b")))
    assert passes == [60, len(val)] * 3  # another pool: scored again


def test_a_stage_is_evaluated_from_trainings_last_scoring_and_each_set_of_weights_once(tiny_shift, make_train_config, monkeypatch):
    """evaluate_stage: the last iterate's figures come from training's last evaluation of the same pool and source
    val (no pass over either), a selected checkpoint that is the last iterate is not predicted again, one that is
    not is (once), and every figure is what evaluating from scratch gives. Another pool is predicted."""
    from conftest import CLASSES, colour_images

    from udaflow import experiment
    from udaflow.data.datasets import UnlabelledImages

    source, target, labels = tiny_shift
    val = LabelledImages(source.images[:12], source.labels[:12], source.classes, "src-val")
    data = ShiftData(source, val, target, LabelledImages(target.images, labels, CLASSES, "tgt"), "transductive")
    cfg = SimpleNamespace(train=SimpleNamespace(device="cpu", amp=True))
    torch.manual_seed(0)
    clf = build_classifier("udaflow_vit_micro", 3)
    result = engine.train(clf, create_method("dann", clf, None), source, target, make_train_config(eval_every=5), steps=15,
                          lr=3e-3, seed=0, source_val=val, keep_checkpoints=True)
    assert result.final_scores is not None and result.final_scores.validators == {k: v for k, v in result.validator_history[-1].items() if k != "step"}
    passes = []
    real_predict = experiment.predict
    monkeypatch.setattr(experiment, "predict", lambda model, images, *a, **k: passes.append(len(images)) or real_predict(model, images, *a, **k))

    def evaluated(train_result, on=data):
        passes.clear()
        out = experiment.evaluate_stage(cfg, StageResult(clf, train_result, 1.0), on)
        assert all(torch.equal(p, q) for p, q in zip(clf.state_dict().values(), result.last_state.values()))  # left at the last iterate
        return {k: v for k, v in out.items() if k != "peak_rss_mb"}, list(passes)

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)

    kept = dict(result.checkpoint_states)
    for step, state in ((15, result.last_state), (5, kept[5])):
        picked = dataclasses.replace(result, selected_state=state, selected_step=step)
        scratch, scratch_passes = evaluated(dataclasses.replace(picked, final_scores=None))
        assert scratch_passes == ([len(target), len(val)] if step == 15 else [len(target), len(val)] * 2)
        reused, reused_passes = evaluated(picked)
        assert same(reused, scratch)
        assert reused_passes == ([] if step == 15 else [len(target), len(val)])  # the earlier checkpoint alone
    assert reused["validators_selected"] != reused["validators_last"]  # two sets of weights were scored

    xb, labels_b = colour_images(60, seed=2, shift=-30.0)
    other = ShiftData(source, val, UnlabelledImages(xb, "tgt-b"), LabelledImages(xb, labels_b, CLASSES, "tgt-b"), "transductive")
    _, other_passes = evaluated(dataclasses.replace(result, selected_state=result.last_state), other)
    assert other_passes == [60, len(val)]  # not the pool training scored: predicted


def test_a_cached_source_model_is_scored_and_selected_again_on_each_target_pool(tiny_shift, make_train_config):
    """A source model is cached per source and serves every target: on another target its validator
    history and selected checkpoint must be this pool's, as if it had been trained beside this pool."""
    from conftest import CLASSES, colour_images

    from udaflow.data.datasets import UnlabelledImages
    from udaflow.experiment import rescore_on_pool

    source, pool_a, labels_a = tiny_shift
    xb, labels_b = colour_images(60, seed=2, shift=-30.0)
    pool_b = UnlabelledImages(xb, "tgt-b")
    val = LabelledImages(source.images[:12], source.labels[:12], source.classes, "src-val")
    cfg = SimpleNamespace(train=SimpleNamespace(device="cpu", amp=True), validator="im")

    def pretrain(pool):
        torch.manual_seed(0)
        clf = build_classifier("udaflow_vit_micro", 3)
        result = engine.train(clf, create_method("source_only", clf, None), source, pool, make_train_config(eval_every=5), steps=20,
                              lr=3e-3, seed=0, source_val=val, keep_checkpoints=True)
        return StageResult(clf, result, 1.0, cached=True)

    def shift(pool, labels):
        return ShiftData(source, val, pool, LabelledImages(pool.images, labels, CLASSES, "tgt"), "transductive")

    on_a, on_b = pretrain(pool_a), pretrain(pool_b)
    assert [s for _, s in on_a.train.checkpoint_states][-1].keys() == on_b.train.last_state.keys()
    for (_, wa), (_, wb) in zip(on_a.train.checkpoint_states, on_b.train.checkpoint_states):
        assert all(torch.equal(wa[k], wb[k]) for k in wa)  # source training never reads the pool
    assert on_a.train.validator_history != on_b.train.validator_history

    same = rescore_on_pool(cfg, on_a, shift(pool_a, labels_a)).train  # its own pool: what training scored, to the bit
    assert same.validator_history == on_a.train.validator_history and same.selected_step == on_a.train.selected_step
    assert all(torch.equal(x, y) for x, y in zip(same.checkpoint_logits, on_a.train.checkpoint_logits))

    moved = rescore_on_pool(cfg, on_a, shift(pool_b, labels_b))  # A's cached model on pool B: B's scores and choice
    assert moved.train.validator_history == on_b.train.validator_history
    assert moved.train.selected_step == on_b.train.selected_step
    assert all(torch.equal(moved.train.selected_state[k], on_b.train.selected_state[k]) for k in on_b.train.selected_state)
    assert all(torch.equal(p, q) for p, q in zip(moved.classifier.state_dict().values(), on_a.train.last_state.values()))  # left at the last iterate
    assert on_a.train.validator_history != moved.train.validator_history  # the cached stage itself is left as it was


def test_out_is_this_bench_s_from_its_start_and_a_folder_is_refused_before_any_training(monkeypatch, tmp_path):
    """A bench stopped before its first row said "the rows done so far are in --out" over an earlier bench's rows
    (other methods, protocol, steps), and the .validators.json beside them stayed that bench's. A folder as --out
    failed with a traceback after the first cell had trained, leaving a stray .tmp file."""
    from udaflow import bench
    from udaflow.config import Config

    out = tmp_path / "bench.json"
    out.write_text('[{"shift": "synth:mnist", "method": "an earlier bench"}]\n')
    out.with_suffix(".validators.json").write_text("{}\n")
    monkeypatch.setattr(bench, "_labelled_shift", lambda *a: None)
    monkeypatch.setattr(bench, "matmul_gflops", lambda **k: 100.0)
    trained = []

    def stopped(*a, **k):
        trained.append(a)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "pretrain_source", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(Config(), [("synth", "mnist")], ["dann"], out=out)
    assert trained and bench.json.loads(out.read_text()) == [] and not out.with_suffix(".validators.json").exists()

    trained.clear()
    with pytest.raises(ValueError, match=rf"^--out {tmp_path}: a folder; name a JSON file"):
        bench.run_bench(Config(), [("synth", "mnist")], ["dann"], out=tmp_path)
    with pytest.raises(ValueError, match=r"^--out /proc/b.json: cannot be written \(No such file or directory\)"):
        bench.run_bench(Config(), [("synth", "mnist")], ["dann"], out="/proc/b.json")
    assert not trained and sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


@pytest.mark.parametrize("tty, width", [(False, 160), (True, 100), (True, 220)])
def test_the_bench_table_prints_every_shift_and_method_name_whole(monkeypatch, tty: bool, width: int):
    """A bench's 14 columns did not fit 160 characters and rich cut the names: two own shifts both read
    'synth:sho…', 'source_on…' (a probe, in a CI log). Piped or on a terminal, no value is cut now."""
    import io

    from rich.console import Console

    import udaflow.cli as cli

    row = {"seed": 0, "target_acc_last": 12.5, "target_acc_selected": 12.0, "selected_by": "im", "selection_loss": 0.5,
           "median_last5_target_acc": 12.0, "source_val_acc_last": 99.1, "seconds": 12.0, "train_images_per_s": 900.0,
           "achieved_gflops": 40.1, "matmul_fraction": 0.43, "device": "cpu"}
    rows = [{**row, "shift": "synth:garage-photos-2026", "method": "source_only"}, {**row, "shift": "synth:loading-dock", "method": "adamatch"}]
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=width, force_terminal=tty, color_system=None))
    cli._print_bench_table(rows)
    lines = out.getvalue().splitlines()
    assert "…" not in out.getvalue()
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    assert [c[:2] for c in cells] == [["synth:garage-photos-2026", "source_only"], ["synth:loading-dock", "adamatch"]]
    assert cells[0][3:5] == ["12.50", "12.00"] and cells[0][-3:] == ["40.10", "43%", "cpu"]
    if tty and width >= 220:  # a terminal wide enough: the terminal's width, headers whole
        assert max(len(line) for line in lines) <= width and any("target acc selected" in line for line in lines)


def test_out_is_refused_when_it_is_not_a_benchs_file_or_another_bench_writes_it(tmp_path, monkeypatch):
    """--out was truncated at the start whatever it held (a typo'd `--out params.yaml` replaced the parameters),
    and two benches with one --out each rewrote it whole after every cell: the later one's rows replaced the
    other's while both said they wrote theirs (a probe)."""
    import json

    from pathlib import Path

    from udaflow.bench import _claim_out

    params = tmp_path / "params.yaml"
    params.write_text("seed: 0\n")
    with pytest.raises(ValueError, match="params.yaml exists and is not a bench's output") as refused:
        with _claim_out(params):
            pass
    assert params.read_text() == "seed: 0\n" and "--out runs/bench-own.json" in refused.value.hint
    earlier = tmp_path / "bench.json"
    earlier.write_text(json.dumps([{"shift": "synth:mnist", "method": "dann", "seed": 0}]))
    earlier.with_suffix(".validators.json").write_text('{"not": "a study"}')  # a file of that name that no bench wrote
    with pytest.raises(ValueError, match="bench.validators.json exists and is not a bench's output"):
        with _claim_out(earlier):
            pass
    earlier.with_suffix(".validators.json").write_text('{"synth:mnist": {"checkpoints": 3}}')
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    with _claim_out(earlier):
        assert json.loads(earlier.read_text()) == [] and not earlier.with_suffix(".validators.json").exists()  # an earlier bench's: replaced
        with pytest.raises(ValueError, match=r"--out \.\./bench.json: another bench is writing it \(pid \d+\); give this one another --out"):
            with _claim_out(Path("../bench.json")):  # the same file by another path, from another folder
                pass
    with _claim_out(earlier):  # released at the end
        pass
    with pytest.raises(ValueError, match="params.yaml is a file, not a folder"):
        with _claim_out(params / "x.json"):
            pass


def test_an_unlabelled_target_is_refused_with_what_to_do_instead(monkeypatch, tmp_path):
    from udaflow import bench
    from udaflow.config import Config
    from udaflow.data import expectations
    from udaflow.data.manifest import DataError

    monkeypatch.setattr(expectations, "validate_shift", lambda *a: expectations.ValidationReport(True))
    monkeypatch.setattr(bench, "load_shift", lambda *a: SimpleNamespace(target_eval=None))
    with pytest.raises(DataError, match="bench needs target labels to report accuracy; domain 'flat' has none") as refused:
        bench._labelled_shift(Config(work_dir=str(tmp_path)), ("synth", "flat"), "transductive")
    assert refused.value.hint.startswith("a bench scores every method on the target's labels: bench a labelled target")


def test_a_parallel_bench_checks_every_shift_in_its_workers_before_any_training(tmp_path):
    """`--jobs 2` runs the shifts' checks in the worker processes, all at once: a shift that fails them stops the
    bench with its one clear error (raised on purpose, across the process boundary), before any training and
    before --out is touched."""
    from udaflow import bench
    from udaflow.config import Config
    from udaflow.data.manifest import DataError

    out = tmp_path / "bench.json"
    out.write_text('[{"shift": "synth:mnist", "method": "an earlier bench"}]\n')
    cfg = Config(work_dir=str(tmp_path / "runs"), data={"root": str(tmp_path / "raw")})
    with pytest.raises(DataError, match=r"domain 'nowhere' not found; ingest your images") as refused:
        bench.run_bench(cfg, [("nowhere", "else")], ["dann"], out=out, jobs=2)
    assert refused.value.raised_on_purpose
    assert out.read_text() == '[{"shift": "synth:mnist", "method": "an earlier bench"}]\n'
    assert not (tmp_path / "runs" / "cache").exists()  # no source model trained


def test_a_sentence_in_a_table_still_wraps_between_words_on_a_terminal(monkeypatch):
    """Only words are kept whole: a run summary's long promotion-gate reason wraps inside a 100-column terminal
    (a review: every cell kept whole made the table 191 columns wide, which the terminal broke mid-box)."""
    import io

    from rich.console import Console
    from rich.table import Table

    import udaflow.cli as cli

    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=100, force_terminal=True, color_system=None))
    table = Table(title="run")
    table.add_column("metric")
    table.add_column("value")
    reason = "promoted to champion: im 2.25 >= 1.01 + gate.min_gain 0.0 on the mnist train pool; its val split reads 100 against 95"
    table.add_row("promotion gate", reason)
    table.add_row("target", "synth:garage-photos-2026")
    cli._show(table)
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 100 and "…" not in out.getvalue()
    cells = " ".join(line.split("│")[2].strip() for line in lines if line.startswith("│"))
    assert reason in cells and "synth:garage-photos-2026" in cells.split()


def test_out_writes_float32_figures_as_their_shortest_decimal_and_a_cached_source_model_gets_no_matmul_share(tmp_path):
    """--out read `"target_acc_last": 10.899999618530273` (a float32 accuracy); and a source_only row read from
    the cache carried an earlier training's seconds, divided by this bench's GEMM rate (6.2%, 11%, 9.1%, 10%
    for the same row across four benches)."""
    import json

    import numpy as np

    from udaflow.bench import settle_row, write_rows

    acc = float(np.float32(10.9))  # 10.899999618530273, as an accuracy computed in float32 reads in Python
    im = float(np.float32(1.2345678))
    row = {"method": "source_only", "target_acc_last": acc, "seconds": 25.318400383, "peak_rss_mb": 1862, "flag": True,
           "validators_last": {"im": im, "snd": 0.123456789012345}, "nan": float("nan"), "regret": [0.5, acc],
           "cached_pretraining": True, "achieved_gflops": 8.4, "matmul_fraction": 0.062, "selected_by": "im"}
    out = tmp_path / "bench.json"
    write_rows([row], out)
    text = out.read_text()
    assert "10.899999618530273" not in text and '"target_acc_last": 10.9,' in text
    [back] = json.loads(text)
    # nothing lost at float32's precision; float64 figures (seconds, a float64 score) keep every digit
    assert np.float32(back["target_acc_last"]) == np.float32(acc) and np.float32(back["validators_last"]["im"]) == np.float32(im)
    assert back["validators_last"]["im"] == 1.2345678 and back["regret"] == [0.5, 10.9]
    assert back["seconds"] == 25.318400383 and back["validators_last"]["snd"] == 0.123456789012345
    assert back["peak_rss_mb"] == 1862 and back["flag"] is True and back["nan"] != back["nan"]

    settled = settle_row(row)
    assert settled["matmul_fraction"] is None and settled["achieved_gflops"] == 8.4 and settled["target_acc_last"] == acc
    assert row["matmul_fraction"] == 0.062  # the caller's row is left as it was
    assert settle_row({**row, "cached_pretraining": False})["matmul_fraction"] == 0.062
    assert "matmul_fraction" not in settle_row({"cached_pretraining": True})


def test_reproduce_compares_each_metric_exactly_and_a_validator_within_1e_6_and_says_which_differ():
    from udaflow.steps import compare_metrics

    original = {"target_acc_selected": 97.304, "target_acc_last": 97.3, "validator_selected.im": 1.5, "validator_selected.snd": 2.0}
    same, rows = compare_metrics(original, {"target_acc_selected": 97.296, "target_acc_last": 97.3,
                                            "validators_selected": {"im": 1.5 + 1e-9, "snd": 2.1}})
    verdicts = {key: ok for key, _, _, ok in rows}
    assert not same and verdicts["target_acc_selected"] is False and verdicts["target_acc_last"] is True
    assert verdicts["validator_selected.im"] is True and verdicts["validator_selected.snd"] is False
    assert compare_metrics({"target_acc_last": 97.3}, {"target_acc_last": 97.3, "validators_selected": {}}) == (True, [("target_acc_last", 97.3, 97.3, True)])
    same, rows = compare_metrics({}, {"target_acc_last": 97.3, "validators_selected": {"im": 1.0}})  # not recorded: not the same
    assert not same and [r[3] for r in rows] == [False, False]


@pytest.mark.parametrize("fraction, shown", [
    (0.5123, "51%"), (1.04, "104%"), (0.0996, "10%"), (0.053, "5.3%"), (0.00027, "0.027%"), (None, "-"),
])
def test_a_share_of_the_gemm_reads_as_a_plain_percentage(fraction, shown):
    """A cell can train faster than the GEMM the bench measured while the machine was busier (a share over 100%,
    seen when `.ci/run` shared the cores at the bench's start): it read `1e+02%`."""
    from udaflow.cli import _share

    assert _share(fraction) == shown
