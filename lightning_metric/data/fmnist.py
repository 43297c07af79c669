"""Fashion-MNIST from its four official IDX files, checked by md5, downloaded when missing."""

from __future__ import annotations

import gzip
import hashlib
import struct
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .base import LabelledDataModule

MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
"""The official download location (zalandoresearch/fashion-mnist README)."""

FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
"""File name -> official md5 of the gzipped file."""

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")


class FashionMNISTDataModule(LabelledDataModule):
    """70,000 grey 28x28 clothing images in 10 classes, as ``(B, 1, 28, 28)`` in [0, 1].

    Args:
        data_dir: folder holding the four ``*-ubyte.gz`` files (created and filled
            from the official location when they are missing and ``download``).
        download: fetch missing files; when off, or offline, a missing file is an
            error naming ``data_dir`` and the four files.
        **kwargs: :class:`~lightning_metric.data.base.LabelledDataModule` options.
    """

    image_size = 28
    class_names = CLASS_NAMES

    def __init__(self, data_dir: str | Path, download: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.data_dir, self.download = Path(data_dir), download

    def prepare_data(self) -> None:
        missing = [name for name in FILES if not (self.data_dir / name).is_file()]
        if missing and self.download:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            for name in missing:
                _fetch(MIRROR + name, self.data_dir / name, self.data_dir)
            missing = [name for name in FILES if not (self.data_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST files missing from data_dir={str(self.data_dir)!r}: {missing}. "
                f"Put the four files {list(FILES)} there (or set data.download=true when online)."
            )
        for name, md5 in FILES.items():
            found = hashlib.md5((self.data_dir / name).read_bytes()).hexdigest()
            if found != md5:
                raise ValueError(
                    f"{self.data_dir / name} has md5 {found}, expected {md5}: the file is "
                    "corrupt or not the official release; delete it to download it again"
                )

    def load_splits(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        self.prepare_data()
        return (
            _images(self.data_dir / "train-images-idx3-ubyte.gz"),
            _labels(self.data_dir / "train-labels-idx1-ubyte.gz"),
            _images(self.data_dir / "t10k-images-idx3-ubyte.gz"),
            _labels(self.data_dir / "t10k-labels-idx1-ubyte.gz"),
        )


def _fetch(url: str, target: Path, data_dir: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            payload = response.read()
    except OSError as error:
        raise FileNotFoundError(
            f"could not download {url} into data_dir={str(data_dir)!r} ({error}); offline? "
            f"Put the four files {list(FILES)} there and run again."
        ) from error
    partial = target.with_suffix(".part")
    partial.write_bytes(payload)
    partial.rename(target)


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    with gzip.open(path, "rb") as stream:
        raw = stream.read()
    found, *shape = struct.unpack(f">{1 + dims}i", raw[: 4 * (1 + dims)])
    if found != magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {found:#x})")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + dims)).reshape(shape)


def _images(path: Path) -> Tensor:
    pixels = _read_idx(path, 0x803, 3)
    return torch.from_numpy(pixels.copy()).unsqueeze(1).float() / 255.0


def _labels(path: Path) -> Tensor:
    return torch.from_numpy(_read_idx(path, 0x801, 1).astype(np.int64))
