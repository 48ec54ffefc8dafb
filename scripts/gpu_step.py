"""What a training step costs on a GPU: images/s, peak memory and model FLOPs utilisation (MFU).

    python scripts/gpu_step.py [--models vit_small_patch16_224,vit_base_patch16_224] [--batch 128] [--out gpu_step.json]

For each timm backbone (udaflow's classifier around it, 10 classes) and each variant:
- `bf16`: bf16 autocast (`train.amp`) with timm's fused attention (F.scaled_dot_product_attention), the default;
- `fp32`: autocast off (fp32 matmuls, TF32 off: torch's default);
- `bf16 unfused`: timm's attention written out (q @ k^T, softmax, @ v) instead of the fused kernel;
- `bf16 compiled`: `train.compile` (torch.compile of the backbone, in place);
- `engine`: udaflow's own loop (`engine.train`, source_only, batch `--batch`) on uint8 images held on
  the host, so the time includes the augmentation on the CPU and the host-to-device copy.

The model-only variants time forward + backward + AdamW on inputs already on the GPU, after warm-up
steps, with the device synchronised. MFU = training FLOPs per image (torch's FlopCounterMode, as the
bench counts them, attention counted unfused) x images/s over the GPU's bf16 GEMM rate measured at the start (8192^2,
`costs.matmul_gflops`); the fp32 row is also given against the fp32 GEMM rate. Needs a CUDA GPU; the
README's "On a GPU" holds the H200's table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from udaflow.costs import matmul_gflops, training_gflop_per_image  # noqa: E402
from udaflow.models import build_classifier  # noqa: E402


def _set_fused(classifier: torch.nn.Module, fused: bool) -> None:
    for module in classifier.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


DEVICE = torch.device("cuda")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated(DEVICE) / 2**30 if DEVICE.type == "cuda" else float("nan")


def model_step(name: str, batch: int, amp: bool, fused: bool, compiled: bool, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    device = DEVICE
    clf = build_classifier(name, 10).to(device).train()
    size = clf.backbone.patch_embed.img_size[0]
    _set_fused(clf, False)  # attention's matmuls counted as written out: FlopCounterMode misses some fused kernels
    per_image = training_gflop_per_image(clf, size, batch=4)
    _set_fused(clf, fused)
    if compiled:
        clf.backbone.compile()
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(10, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            loss = F.cross_entropy(clf(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_compile = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync()
    warm_s = time.perf_counter() - t_compile
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    seconds = time.perf_counter() - t0
    return {
        "images_per_s": batch * steps / seconds, "ms_per_step": 1000 * seconds / steps, "warmup_s": warm_s,
        "gflop_per_image": per_image, "peak_mem_gib": _peak_gib(),
    }


def engine_step(name: str, batch: int, steps: int) -> dict:
    """udaflow's engine.train (source_only, default augmentation, bf16) on random uint8 images on the host."""
    from udaflow.config import TrainConfig
    from udaflow.data.datasets import LabelledImages
    from udaflow.engine import train
    from udaflow.methods import create_method

    torch.manual_seed(0)
    clf = build_classifier(name, 10)
    size = clf.backbone.patch_embed.img_size[0]
    n = 4 * batch
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    source = LabelledImages(images, torch.arange(n) % 10, tuple(str(i) for i in range(10)), "random")
    cfg = TrainConfig(device=str(DEVICE), batch_size=batch, eval_every=10**6, checkpoint_every=10**6, warmup_steps=1, progress=False)
    method = create_method("source_only", clf, {}, {})
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
    warm = train(clf, method, source, None, cfg, steps=3, lr=1e-4, seed=0)  # cuDNN/cuBLAS set-up, not timed below
    result = train(clf, method, source, None, cfg, steps=steps, lr=1e-4, seed=0)
    return {"images_per_s": result.images_per_s, "ms_per_step": 1000 * result.seconds / steps, "warmup_s": warm.seconds,
            "peak_mem_gib": _peak_gib()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", default="vit_small_patch16_224", help="models to time compiled too (compiling takes a minute)")
    parser.add_argument("--out", type=Path, default=Path("gpu_step.json"))
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script itself (tiny --models, --steps 2)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("error: scripts/gpu_step.py needs a CUDA GPU (none is visible)", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"
    bf16 = matmul_gflops(device=DEVICE, dtype=torch.bfloat16)
    fp32 = matmul_gflops(device=DEVICE, dtype=torch.float32)
    print(f"{gpu}, torch {torch.__version__}: bf16 GEMM {bf16 / 1000:.0f} TFLOP/s, fp32 GEMM {fp32 / 1000:.1f} TFLOP/s (8192^2)", flush=True)
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        variants = [("bf16", True, True, False), ("fp32", False, True, False), ("bf16 unfused", True, False, False)]
        if name in args.compile.split(","):
            variants.append(("bf16 compiled", True, True, True))
        per_image = None
        for label, amp, fused, compiled in variants:
            row = {"model": name, "variant": label, "batch": args.batch, **model_step(name, args.batch, amp, fused, compiled, args.steps, args.warmup)}
            per_image = row["gflop_per_image"]
            row["achieved_tflops"] = row["gflop_per_image"] * row["images_per_s"] / 1000
            row["mfu_bf16_gemm"] = row["achieved_tflops"] * 1000 / bf16
            if not amp:
                row["of_fp32_gemm"] = row["achieved_tflops"] * 1000 / fp32
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
        row = {"model": name, "variant": "engine", "batch": args.batch, **engine_step(name, args.batch, args.steps)}
        row["achieved_tflops"] = per_image * row["images_per_s"] / 1000
        row["mfu_bf16_gemm"] = row["achieved_tflops"] * 1000 / bf16
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "bf16_gemm_gflops": bf16, "fp32_gemm_gflops": fp32, "rows": rows}, indent=1))
    print(f"{'model':<24} {'variant':<14} {'img/s':>8} {'ms/step':>8} {'peak GiB':>8} {'TFLOP/s':>8} {'MFU':>6}")
    for r in rows:
        print(f"{r['model']:<24} {r['variant']:<14} {r['images_per_s']:>8.0f} {r['ms_per_step']:>8.1f} {r['peak_mem_gib']:>8.2f} "
              f"{r['achieved_tflops']:>8.1f} {100 * r['mfu_bf16_gemm']:>5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
