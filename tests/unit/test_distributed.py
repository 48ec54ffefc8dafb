"""Data-parallel training under torchrun (gloo on CPU) equals single-process training on the same
global batch: parameters within float rounding (5e-5, against steps of about 3e-3) after two optimiser
steps, pairs and pseudo-label state identical on every rank."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from udaflow import distributed
from udaflow.config import ConfigError

WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS = 2  # the second step runs with the first step's synced BatchNorm statistics and a non-zero GRL coefficient


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _states(tmp_path: Path, method: str, nproc: int) -> list[dict]:
    out = tmp_path / f"{method}-{nproc}"
    if nproc == 1:
        _run([sys.executable, str(WORKER), method, str(out), str(STEPS)])
    else:
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER), method, str(out), str(STEPS)])
    return [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(nproc)]


def _max_diff(a: dict, b: dict, skip=()) -> float:
    return max(((a[k].float() - b[k].float()).abs().max().item() for k in a if k not in skip), default=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dann", "cdtrans", "adamatch"])
def test_two_process_steps_equal_the_single_process_steps(method, tmp_path):
    (single,) = _states(tmp_path, method, 1)
    ranks = _states(tmp_path, method, 2)
    assert single["world"] == 1 and all(r["world"] == 2 for r in ranks)
    floats = [k for k, v in single["last"].items() if v.is_floating_point()]
    assert max((single["last"][k] - single["start"][k]).abs().max().item() for k in floats) > 1e-3  # the steps trained
    # every rank holds the same weights, equal to the single process's up to float rounding. The conv stem
    # runs channels-last: the single process's BatchNorm kernel and the ranks' synced sums round differently
    # (about 1e-6 relative in the stem's output, 10x the NCHW kernels'), and Adam's normalised steps grow that
    # on near-zero gradients: measured 1.1e-5 to 1.8e-5 (1e-5 held with the NCHW stem). A rank that averaged
    # the wrong gradients would be off by the step size, 3e-3.
    assert _max_diff(ranks[0]["last"], ranks[1]["last"]) == 0.0
    assert _max_diff(single["last"], ranks[0]["last"]) < 5e-5
    # the method's own modules too. A Linear bias feeding a BatchNorm (the domain discriminator's) has a zero
    # gradient in exact arithmetic; Adam turns its rounding noise into +-lr steps, so it and the BN
    # running mean it shifts are only bounded by the step size.
    dead = {k for k in single["method"] if k.startswith("discriminator.") and (k.endswith(("0.bias", "3.bias")) or k.endswith(("1.running_mean", "4.running_mean")))}
    assert _max_diff(single["method"], ranks[0]["method"], skip=dead) < 3e-4  # dann's discriminator.3.weight: 9e-5, as above
    assert _max_diff(single["method"], ranks[0]["method"]) <= 2 * 3e-3
    assert _max_diff(ranks[0]["method"], ranks[1]["method"]) == 0.0
    # what the ranks derive from the whole target (cdtrans's pairs, adamatch's class-balanced
    # pseudo-label status) is identical on every rank and equal to the single process's
    for key, value in single["extra"].items():
        if key == "neighbour_bank":  # adamatch's memory of the target pool: gathered rows, the same on every rank
            for part, tensor in value.items():
                assert torch.equal(ranks[0]["extra"][key][part], ranks[1]["extra"][key][part]), part
                assert torch.allclose(ranks[0]["extra"][key][part], tensor, atol=1e-5), part
            continue
        assert torch.equal(ranks[0]["extra"][key], ranks[1]["extra"][key]) and torch.equal(ranks[0]["extra"][key], value), key
    if method == "cdtrans":
        assert len(single["extra"]["pairs"]) > 0
    if method == "adamatch":
        assert torch.allclose(single["method"]["pseudo_labels.status"], ranks[1]["method"]["pseudo_labels.status"], atol=1e-6)
        assert single["extra"]["neighbour_bank"]["features"].shape[0] > 0  # the consensus took part
    # rank 0's loss record is the global batch's: the mean over ranks of their share's means
    for a, b in zip(single["losses"], ranks[0]["losses"]):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)


def test_one_process_helpers_are_identities():
    x = torch.arange(12.0).reshape(6, 2)
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard(x) is x and distributed.gather(x) is x
    (rows,) = distributed.gather_rows(6, lambda s: (x[s],))
    assert torch.equal(rows, x)


def test_a_global_batch_that_does_not_split_evenly_is_refused(tmp_path):
    from udaflow.config import load_config
    from udaflow.preflight import validate_run

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "params.yaml", None, ["train.nproc=3", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"train.nproc: 3 processes cannot split train.batch_size = 64 evenly"):
        validate_run(cfg, domains=())


def test_the_bench_refuses_more_than_one_process(tmp_path):
    from udaflow.bench import run_bench
    from udaflow.config import load_config

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "params.yaml", None, ["train.nproc=2", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match="train.nproc: the bench trains in one process"):
        run_bench(cfg, [("synth", "mnist")], ["dann"])


FAILING_RANK = """
import sys
from pathlib import Path
from udaflow import steps
from udaflow.config import load_config
root = Path(sys.argv[1])
small = ["source=synth", "target=fonts-b", "model.backbone=udaflow_vit_micro", "train.pretrain_steps=4", "train.adapt_steps=40", "train.eval_every=5",
         "train.checkpoint_every=5", "train.warmup_steps=1", "train.batch_size=8", "method=dann", "train.num_threads=1"]
steps.pretrain(load_config(root / "params.yaml", None, small))
cfg = load_config(root / "params.yaml", None, [*small, "train.nproc=2"])
checkpoint = steps.run_paths(cfg).checkpoint
checkpoint.with_name(checkpoint.name + ".tmp").mkdir(parents=True)  # rank 0 alone writes it: its first save fails
steps.adapt(cfg)
"""


@pytest.mark.slow
def test_a_rank_that_fails_ends_the_run_instead_of_hanging_the_others(tmp_path, new_shift_project):
    """Rank 0's checkpoint write failed (a directory in its way; a full disk fails the same way) while rank 1
    waited in the next step's gradient all-reduce: rank 0's `finally` barrier held both until gloo's
    30-minute timeout, the error unprinted. Now rank 0's error is printed and the launch fails within seconds."""
    import time

    root = new_shift_project(tmp_path / "project", tmp_path / "scratch", 40)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", FAILING_RANK, str(root)], cwd=root, env=env, capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and time.monotonic() - t0 < 200, output[-3000:]
    assert "adapt under torchrun (2 processes) failed with exit code" in output, output[-3000:]
    assert "checkpoint.pt.tmp: the resume checkpoint could not be written (Is a directory)" in output, output[-3000:]  # rank 0's, printed


def test_timm_s_batchnorm_with_activation_is_synced_and_a_foreign_forward_refused(monkeypatch):
    """timm's BatchNormAct2d (mobilenetv3, efficientnet, regnet) subclasses BatchNorm2d: it was left unsynced
    under --nproc. Its synced twin normalises by the statistics of every rank's rows, then applies its dropout
    and activation: with one rank (the all-reduce an identity) it equals the layer itself, output and buffers."""
    from timm.layers import BatchNormAct2d

    from udaflow.config import ConfigError

    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5) * 3 + 1
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), BatchNormAct2d(4, act_layer=torch.nn.ReLU), torch.nn.BatchNorm2d(4))
    plain = __import__("copy").deepcopy(model)
    distributed.sync_batchnorm_(model)
    assert [type(m).__name__ for m in model] == ["Conv2d", "SyncedBatchNormAct2d", "SyncedBatchNorm2d"]
    assert set(model.state_dict()) == set(plain.state_dict())
    monkeypatch.setattr(distributed, "active", lambda: True)  # the synced path, on one rank: the sum over ranks is the value
    monkeypatch.setattr(distributed._SumOverRanks, "apply", staticmethod(lambda t: t))
    assert (model.train()[:2](x) >= 0).all()  # the activation applied after the normalisation
    model.load_state_dict(plain.state_dict())  # the running statistics as they were
    out, expected = model.train()(x), plain.train()(x)
    assert torch.allclose(out, expected, atol=1e-5)  # the statistics the batch's, then the ReLU
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    distributed.unsync_batchnorm_(model)
    assert [type(m) for m in model] == [torch.nn.Conv2d, BatchNormAct2d, torch.nn.BatchNorm2d]

    class OwnForward(torch.nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ConfigError, match=r"OwnForward, a BatchNorm layer of the backbone with a forward of its own, cannot be synchronised"):
        distributed.sync_batchnorm_(torch.nn.Sequential(OwnForward(3)))
    distributed.check_syncable(model)  # BatchNorm2d, BatchNormAct2d: nothing to refuse


def test_a_backbone_whose_batchnorm_cannot_be_synced_is_refused_before_anything_trains(tmp_path, monkeypatch):
    """`--nproc 2` with such a backbone: validate_run refuses it, naming train.nproc, before Prefect starts."""
    from udaflow import preflight
    from udaflow.config import load_config

    class OwnForward(torch.nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    monkeypatch.setattr(preflight, "create_backbone", lambda *a, **k: torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), OwnForward(3)))
    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "params.yaml", None, [f"data.root={tmp_path}"])
    preflight.validate_run(cfg, domains=())  # one process: nothing to sync
    cfg = load_config(repo / "params.yaml", None, ["train.nproc=2", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match="train.nproc: .*OwnForward, a BatchNorm layer of the backbone"):
        preflight.validate_run(cfg, domains=())
