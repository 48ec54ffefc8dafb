"""What a training step costs, in units that compare across machines.

`matmul_gflops` measures this machine's GEMM rate (a large square matmul, best of a few: fp32 on CPU,
bf16 on a GPU that trains under autocast, `training_matmul`);
`training_gflop_per_image` counts the FLOPs of one forward + backward pass of a classifier per image
(torch's FlopCounterMode: matmuls and convolutions, a convolution's backward by `_conv_backward_flop`,
which torch gets wrong for grouped ones). Achieved GFLOP/s = GFLOP per image x images/s;
its ratio to the GEMM rate says how much of the machine the training loop uses.
`machine` names the hardware a run's numbers came from.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch


def matmul_gflops(n: int | None = None, repeats: int = 5, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Best-of-`repeats` (n x n) @ (n x n) rate on `device` in `dtype`, in GFLOP/s (2 n^3 FLOPs per product).

    On CPU fp32 at n = 2048 (a 2-core CPU: a fraction of a second). On a GPU n = 8192 by default: a
    2048-square product is over in microseconds there, and its rate would be launch overhead, not the
    tensor cores' (an H200's bf16 GEMM runs near 790 TFLOP/s at 8192, README "On a GPU")."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(2 if device.type == "cuda" else 1):  # warm-up: thread pool, caches; cuBLAS's handle and clocks
        torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def training_matmul(device: torch.device | str, amp: bool) -> tuple[torch.device, torch.dtype]:
    """The device and dtype whose GEMM rate a training loop on `device` is measured against: bf16 on a
    GPU under autocast (`train.amp`, its matrix products run in bf16), fp32 otherwise (autocast is off on CPU)."""
    device = torch.device(device)
    return device, torch.bfloat16 if device.type == "cuda" and amp else torch.float32


def gemm_name(device: torch.device | str, dtype: torch.dtype) -> str:
    """What a GEMM rate is of: "cpu float32", or the GPU's name and the dtype ("NVIDIA H200 bfloat16")."""
    device = torch.device(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{where} {str(dtype).removeprefix('torch.')}"


def cpu_name() -> str:
    """The CPU's model name with its vendor, family and model numbers (/proc/cpuinfo on Linux; a virtual
    machine often shows a generic name such as "Intel(R) Xeon(R) Processor"), else what `platform` knows."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), " ".join(value.split()))
    except (OSError, ValueError):  # no such file (macOS, Windows), or not text
        pass
    if "model name" not in fields:  # ARM's cpuinfo names the core by implementer and part numbers
        if "CPU implementer" in fields:
            return f"{platform.machine()} (implementer {fields['CPU implementer']}, part {fields.get('CPU part', '?')})"
        return platform.processor() or platform.machine() or "unknown"
    ids = [fields.get("vendor_id"), f"family {fields['cpu family']}" if "cpu family" in fields else None,
           f"model {fields['model']}" if "model" in fields else None]
    return f"{fields['model name']} ({', '.join(i for i in ids if i)})"


def machine(device: torch.device | str = "cpu") -> dict[str, str]:
    """The hardware a run computes on, as run tags: the CPU model, the vector instructions torch's CPU
    kernels dispatch to, and the GPU when `device` is one.

    Deterministic training repeats its bits on the same hardware and torch build, not across CPU models:
    MKL and oneDNN choose kernels (and so the order floating-point sums are taken in) by CPU. The same
    seed-0 source pretraining read 72.90 / 65.06 on an AMD EPYC and 67.78 / 61.62 on an Intel Xeon with
    AMX (README, "Reproduction"); `udaflow reproduce` names both machines when they differ."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return {"hardware.cpu": cpu_name(), "hardware.cpu_capability": torch.backends.cpu.get_cpu_capability(), "hardware.gpu": gpu}


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed, _output_padding,
                        _groups, output_mask, out_shape=None, **_) -> int:
    """FLOPs of aten.convolution_backward: each gradient asked for (input, weight) costs what the forward
    convolution does, 2 x batch x output positions x C_out x (C_in / groups) x kernel size.

    torch's own formula (2.14) counts the weight gradient of a grouped convolution as if it were dense: a
    depthwise 3x3 conv over 192 channels read 96x its backward FLOPs (its weight gradient 192x), so a
    timm backbone with depthwise convolutions (ConvNeXt, MobileNet, EfficientNet) reported several
    times its real GFLOP an image. For groups = 1 this is the same number torch's formula gives (tests/unit/test_bench_report.py).
    """
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def training_gflop_per_image(classifier: torch.nn.Module, image_size: int, batch: int = 8) -> float:
    """GFLOP of one forward + backward pass per image (B = `batch` images, 3 channels, train mode).

    Counted on a CPU copy in fp32: the classifier itself (its BatchNorm statistics, its gradients) is
    left as it was, and a model trained on a GPU counts the same FLOPs as on a CPU."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(classifier).cpu().float().train()
    x = torch.randn(batch, 3, image_size, image_size)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})
    with counter:
        model(x).sum().backward()
    return counter.get_total_flops() / batch / 1e9
