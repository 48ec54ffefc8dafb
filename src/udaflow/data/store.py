"""Decoded images on disk, read per batch: a domain's pixels without holding them in memory.

A domain split is decoded once per image size into one flat file of (N, 3, S, S) uint8 rows, named
by the content of its manifest rows (each file's sha256, the same content DVC versions) and the
size, so a new version of the data or another `data.image_size` gets a file of its own and an
unchanged one is never decoded again. `ImageFile` then reads the rows a batch asks for with
`os.pread`: the operating system's page cache keeps the hot rows, the training process holds only
the batch, so its resident memory does not grow with the domain (a 50,000-image target costs no
more RSS than a 5,000-image one). It indexes like the uint8 tensor it replaces (`len`, `shape`, an
int, a slice, a tensor or list of row indices), so the engine, the validators and the evaluation
read it unchanged.

Example:
    >>> store = ImageFile.build(path, iter_pixels(rows), n=len(rows), size=32)   # once
    >>> batch = store[torch.tensor([5, 0, 17])]                                    # (3, 3, 32, 32) uint8
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

FORMAT = "udaflow-rows-v3"  # bump when decoding changes: old files are then never read (v2: EXIF orientation applied;
#                            v3: a transparent colour as alpha, float grey images)


def content_key(items: Sequence[tuple[str, str]], size: int, variant: str = "") -> str:
    """A name for the decoded rows of (path, sha256) items at `size` px (`variant`: resize/crop, ImageSpec.variant)."""
    h = hashlib.sha256(f"{FORMAT}:{size}{':' + variant if variant else ''}\n".encode())
    for path, digest in items:
        h.update(f"{path}\t{digest}\n".encode())
    return h.hexdigest()[:20]


class ImageFile:
    """(N, 3, S, S) uint8 rows in a flat file, read on demand; see the module docstring."""

    def __init__(self, path: Path, size: int, key: str = ""):
        self._fd: int | None = None  # first: __del__ reads it even when a check below refuses the file
        self._pid = -1
        self.path, self.size, self.key = Path(path), size, key
        self.row_bytes = 3 * size * size
        total = self.path.stat().st_size
        if total % self.row_bytes:
            raise ValueError(f"{self.path}: {total} bytes is not a whole number of {size}x{size} RGB rows")
        self.n = total // self.row_bytes

    @classmethod
    def build(cls, path: Path, rows: Iterable[np.ndarray], n: int, size: int, key: str = "") -> "ImageFile":
        """Write `n` decoded (3, size, size) uint8 arrays to `path` (atomically) and open it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        written = 0
        try:
            with tmp.open("wb") as f:
                for array in rows:
                    f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
                    written += 1
        except BaseException:  # a file that fails to decode, Ctrl-C, a full disk: no partial file left in the cache folder
            tmp.unlink(missing_ok=True)
            raise
        if written != n:
            tmp.unlink(missing_ok=True)
            raise ValueError(f"{path}: expected {n} images, decoded {written}")
        os.replace(tmp, path)  # a concurrent builder of the same content writes the same bytes
        return cls(path, size, key)

    # --- the uint8 tensor it stands in for ----------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n, 3, self.size, self.size)

    dtype = torch.uint8

    def __len__(self) -> int:
        return self.n

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _read(self, start: int, count: int) -> np.ndarray:
        data = os.pread(self._file(), count * self.row_bytes, start * self.row_bytes)
        return np.frombuffer(data, dtype=np.uint8).reshape(count, 3, self.size, self.size)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.dim() == 0):
            i = int(key)
            i = i + self.n if i < 0 else i
            if not 0 <= i < self.n:
                raise IndexError(f"row {int(key)} out of range for {self.n} images")
            return torch.from_numpy(self._read(i, 1)[0].copy())
        if isinstance(key, slice):
            start, stop, step = key.indices(self.n)
            if step == 1:
                return torch.from_numpy(self._read(start, max(0, stop - start)).copy())
            key = range(start, stop, step)
        idx = torch.as_tensor(key, dtype=torch.long).reshape(-1)
        if len(idx) and (int(idx.min()) < -self.n or int(idx.max()) >= self.n):
            raise IndexError(f"row index out of range for {self.n} images")
        out = np.empty((len(idx), 3, self.size, self.size), dtype=np.uint8)
        for j, i in enumerate(idx.tolist()):
            out[j] = self._read(i % self.n, 1)[0]
        return torch.from_numpy(out)

    def __getstate__(self):
        return {"path": self.path, "size": self.size, "key": self.key}

    def __setstate__(self, state):
        self.__init__(state["path"], state["size"], state["key"])

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"ImageFile({self.path}, {self.n} x 3 x {self.size} x {self.size})"


Images = torch.Tensor | ImageFile  # what LabelledImages / UnlabelledImages hold


def digest(images: Images) -> str:
    """The content of a domain's pixels, for a run's fingerprint: the file's key, or the tensor's bytes."""
    if isinstance(images, ImageFile):
        return images.key or content_key([(str(images.path), str(images.path.stat().st_size))], images.size)
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()
