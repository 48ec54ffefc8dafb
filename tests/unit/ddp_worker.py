"""One rank of tests/unit/test_distributed.py: a few engine steps of a method on the tiny shift.

Run alone (one process) or under `torchrun --nproc_per_node N`; each rank saves what it trained to
<out>.rank<r>.pt so the test can compare ranks with each other and with the single process. An optional
fourth argument names the device (cpu, the default: gloo; cuda: nccl, tests/gpu).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import CLASSES, colour_images, tiny_train_config  # noqa: E402

from udaflow import distributed, engine  # noqa: E402
from udaflow.data.datasets import LabelledImages, UnlabelledImages  # noqa: E402
from udaflow.methods import create_method  # noqa: E402
from udaflow.models import build_classifier  # noqa: E402


def main(method_name: str, out: str, steps: int, device: str = "cpu") -> None:
    distributed.init_from_env(device)
    xs, ys = colour_images(60, seed=0)
    xt, _ = colour_images(60, seed=1, shift=20.0)
    source, target = LabelledImages(xs, ys, CLASSES, "src"), UnlabelledImages(xt, "tgt")
    torch.manual_seed(0)
    clf = build_classifier("udaflow_vit_micro", len(CLASSES))
    start = {k: v.clone() for k, v in clf.state_dict().items()}
    method = create_method(method_name, clf, {}, {"balance": True, "agreement": False, "neighbours": 3})  # adamatch's memory of the pool too
    cfg = tiny_train_config(rotation_weight=0.5, eval_every=100, checkpoint_every=100, device=device)
    result = engine.train(clf, method, source, target, cfg, steps=steps, lr=cfg.adapt_lr, seed=0, auxiliary=True)
    torch.save({
        "start": start, "last": result.last_state, "method": {k: v.clone() for k, v in method.state_dict().items()},
        "extra": method.extra_state(), "losses": result.loss_history, "world": distributed.world_size(),
    }, f"{out}.rank{distributed.rank()}.pt")
    if distributed.active():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
