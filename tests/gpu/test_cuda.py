"""The CUDA path: bf16 autocast with fused attention, weights handed back on the host, a killed run
resuming to the same bits on the same GPU and from a GPU's checkpoint on a CPU, the GEMM rate the bench
measures speed against, and two ranks on two GPUs under nccl (where there are two).

Skipped on a machine without a CUDA GPU (CI has none): `python -m pytest tests/gpu` on one. The README's
"On a GPU" says when these last ran and on what.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from udaflow import engine
from udaflow.config import AugmentConfig
from udaflow.costs import matmul_gflops, training_matmul
from udaflow.data.transforms import VIEWS, augment_view

from conftest import Killed, fresh_method  # noqa: E402

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before this process's first cuBLAS call, as `udaflow` sets it
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REPO = Path(__file__).resolve().parents[2]
# params.yaml's train.pseudo_labels: class-balanced thresholds and the neighbourhood memory, which trains on the GPU
DEFAULT_PSEUDO_LABELS = {"balance": True, "neighbours": 10}


def _accuracy(clf, state: dict, images: torch.Tensor, labels: torch.Tensor) -> float:
    clf.load_state_dict(state)
    _, logits = engine.predict(clf.cpu(), images, "cpu")
    return (logits.argmax(1) == labels).float().mean().item()


def test_deterministic_training_on_cuda_keeps_off_the_attention_kernels_torch_calls_non_deterministic(tiny_shift, make_train_config):
    """Without the restriction torch picked cuDNN's attention and the memory-efficient kernel for udaflow's
    ViTs on an H200 and warned that their backward is non-deterministic (the warning comes once a process: this test runs first)."""
    source, target, _ = tiny_shift
    clf, method = fresh_method("adamatch", pseudo_labels=DEFAULT_PSEUDO_LABELS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.train(clf, method, source, target, make_train_config(device="cuda", deterministic=True), steps=10, lr=3e-3, seed=0)
    assert not [str(w.message) for w in caught if "non-deterministic" in str(w.message)]


def test_adaptation_on_cuda_runs_bf16_with_fused_attention_and_hands_back_fp32_host_weights(tiny_shift, make_train_config):
    source, target, target_labels = tiny_shift
    clf, method = fresh_method("adamatch", pseudo_labels=DEFAULT_PSEUDO_LABELS)
    fused = [m.fused_attn for m in clf.modules() if hasattr(m, "fused_attn")]
    assert fused and all(fused)  # timm's F.scaled_dot_product_attention, not q @ k^T written out
    seen: list[torch.dtype] = []
    hook = clf.backbone.blocks[0].mlp.fc1.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    cfg = make_train_config(device="cuda", rotation_weight=0.5)
    result = engine.train(clf, method, source, target, cfg, steps=60, lr=3e-3, seed=0, auxiliary=True)
    hook.remove()
    assert result.device.startswith("cuda") and result.steps == 60 and result.images_per_s > 0
    assert set(seen) == {torch.bfloat16}  # every training and validator forward under autocast (train.amp)
    for key, value in result.last_state.items():
        assert value.device.type == "cpu", key
        assert not value.is_floating_point() or value.dtype == torch.float32, key  # autocast never casts the weights
    accuracy = _accuracy(clf, result.selected_state, target.images, target_labels)
    assert accuracy >= 0.9, accuracy  # the colour shift is learnt on the GPU as on the CPU (100% there)


@pytest.mark.parametrize("method_name, options, pseudo_labels", [
    ("dann", None, None), ("adamatch", {"teacher_ema": 0.9}, None), ("adamatch", None, DEFAULT_PSEUDO_LABELS)])
def test_a_killed_run_on_cuda_resumes_to_the_same_bits(method_name, options, pseudo_labels, tiny_shift, make_train_config, tmp_path):
    """train.deterministic on a GPU: deterministic kernels and cuBLAS's fixed workspace, the augmentation
    drawn on the host's generator: the same GPU repeats a run, and a resumed one, to the bit."""
    source, target, _ = tiny_shift
    cfg = make_train_config(device="cuda", checkpoint_every=10, eval_every=10, deterministic=True)

    def run(ckpt: Path, kill_at_call: int | None = None):
        clf, method = fresh_method(method_name, options, kill_at_call, pseudo_labels)
        return engine.train(clf, method, source, target, cfg, steps=20, lr=3e-3, seed=0, checkpoint_path=ckpt, fingerprint="gpu")

    uninterrupted = run(tmp_path / "a.pt")
    with pytest.raises(Killed):
        run(tmp_path / "b.pt", kill_at_call=16)
    resumed = run(tmp_path / "b.pt")
    assert resumed.resumed_from == 10
    for key, value in uninterrupted.last_state.items():
        assert torch.equal(value, resumed.last_state[key]), key
    assert resumed.loss_history == uninterrupted.loss_history


def test_a_checkpoint_written_on_cuda_resumes_on_a_cpu(tiny_shift, make_train_config, tmp_path):
    """A GPU worker killed mid-run, its run continued on a CPU-only machine: the checkpoint is read onto
    the host (map_location) and the optimiser's state follows the parameters, so the CPU picks it up at its step."""
    source, target, target_labels = tiny_shift
    ckpt = tmp_path / "ckpt.pt"
    clf, method = fresh_method("dann", kill_at_call=26)
    with pytest.raises(Killed):
        engine.train(clf, method, source, target, make_train_config(device="cuda", checkpoint_every=20, eval_every=20),
                     steps=40, lr=3e-3, seed=0, checkpoint_path=ckpt, fingerprint="gpu")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["step"] == 20
    clf, method = fresh_method("dann")
    resumed = engine.train(clf, method, source, target, make_train_config(device="cpu", checkpoint_every=20, eval_every=20),
                           steps=40, lr=3e-3, seed=0, checkpoint_path=ckpt, fingerprint="gpu")
    assert resumed.resumed_from == 20 and resumed.device == "cpu"
    assert _accuracy(clf, resumed.last_state, target.images, target_labels) >= 0.9


@pytest.mark.parametrize("view", VIEWS)
def test_a_batch_is_augmented_on_the_gpu_with_the_numbers_the_cpu_draws(view):
    """The engine augments on the device it trains on; the draws stay on the run's CPU generator, so a GPU
    run takes the same random numbers as a CPU run and differs only by the kernels' rounding."""
    cfg = AugmentConfig(rotate=10, scale=0.1, strong_rotate=20, strong_shear=0.2)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    on_cpu_draws, on_gpu_draws = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    on_cpu = augment_view(images, cfg, on_cpu_draws, view)
    on_gpu = augment_view(images.cuda(), cfg, on_gpu_draws, view)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8
    assert torch.equal(on_cpu_draws.get_state(), on_gpu_draws.get_state())
    diff = (on_gpu.cpu().int() - on_cpu.int()).abs()
    assert diff.float().mean() < 0.5 and (diff > 2).float().mean() < 0.01, (diff.float().mean(), (diff > 2).float().mean())


def test_the_bench_measures_a_gpu_against_its_bf16_gemm_rate():
    device, dtype = training_matmul("cuda", amp=True)
    assert (device.type, dtype) == ("cuda", torch.bfloat16)
    assert training_matmul("cuda", amp=False)[1] == torch.float32 and training_matmul("cpu", amp=True)[1] == torch.float32
    bf16 = matmul_gflops(device=device, dtype=dtype)
    fp32 = matmul_gflops(device=device, dtype=torch.float32)
    assert bf16 > 2 * fp32 > 0  # tensor cores: the ratio the bench's matmul_fraction is read against


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs a GPU per rank")
def test_two_ranks_on_two_gpus_train_like_one_process(tmp_path):
    worker = REPO / "tests/unit/ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for nproc in (1, 2):
        cmd = [sys.executable, str(worker), "dann", str(tmp_path / f"n{nproc}"), "2", "cuda"]
        if nproc == 2:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one = torch.load(tmp_path / "n1.rank0.pt", weights_only=False)["last"]
    for rank in range(2):
        ranked = torch.load(tmp_path / f"n2.rank{rank}.pt", weights_only=False)["last"]
        assert max((one[k].float() - ranked[k].float()).abs().max().item() for k in one) < 1e-3
