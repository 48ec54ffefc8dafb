"""What a training step costs, in units that compare across machines.

`matmul_gflops` measures this machine's fp32 GEMM rate (a large square matmul, best of a few);
`training_gflop_per_image` counts the FLOPs of one forward + backward pass of a classifier per image
(torch's FlopCounterMode: matmuls and convolutions, a convolution's backward by `_conv_backward_flop`,
which torch gets wrong for grouped ones). Achieved GFLOP/s = GFLOP per image x images/s;
its ratio to the GEMM rate says how much of the machine the training loop uses.
"""

from __future__ import annotations

import time

import torch


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 (n x n) @ (n x n) rate on CPU, in GFLOP/s (2 n^3 FLOPs per product)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool, caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


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
    """GFLOP of one forward + backward pass per image (B = `batch` images, 3 channels, train mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = classifier.training
    classifier.train()
    device = next(classifier.parameters()).device
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})
    try:
        with counter:
            classifier(x).sum().backward()
    finally:
        classifier.zero_grad(set_to_none=True)
        classifier.train(was_training)
    return counter.get_total_flops() / batch / 1e9
