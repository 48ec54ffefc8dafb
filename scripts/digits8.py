"""A fourth shift udaflow's defaults are checked on (docs/measurements.md, "A fourth shift: 8x8 scanned digits"), built
as a user would bring one: `python scripts/digits8.py DIR`, then `udaflow data ingest DIR --name digits8 --source mnist`
and `udaflow bench --shifts mnist:digits8,synth:digits8`.

'digits8': scikit-learn's copy of the UCI optical-recognition digits, 1,797 handwritten digits scanned to 8x8 pixels of
17 grey levels (0-16), written as they are, white ink on black like MNIST, scaled to 0-255: an ImageFolder (one folder
per class) of 8x8 grey PNGs. udaflow's ingest and training resize them to the backbone's 32 px, so the shift is the
scanner's resolution and the writers, not colour."""
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

out = Path(sys.argv[1] if len(sys.argv) > 1 else "digits8-images")
digits = load_digits()
for i, (img, label) in enumerate(zip(digits.images, digits.target)):
    d = out / str(int(label))
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(img * 255 / 16).astype(np.uint8), "L").save(d / f"d{i:04d}.png")
print(f"{len(digits.target)} images -> {out}")
