"""Data sets read from local paths (nothing is downloaded).

- CIFAR-100 in torchvision's on-disk layout: ``<root>/cifar-100-python/{train,test,meta}``
  (Python pickles with keys ``data`` (N x 3072 uint8, channel-major 32 x 32),
  ``fine_labels``, ``coarse_labels``, ``filenames``, ``batch_label``; ``meta``
  has ``fine_label_names``). ``root`` may also be the ``cifar-100-python`` folder.
- ImageNet in ImageFolder layout: ``<root>/train/<class>/*.JPEG`` and
  ``<root>/val/<class>/*`` (classes are the sorted sub-folder names), read with PIL.
- scikit-learn's digits (shipped inside scikit-learn): the embedded default.

Augmentation is done on tensors (CIFAR: 4-pixel padded random crop + flip;
ImageNet: random-resized crop + flip for training, resize + centre crop for
evaluation), so no torchvision is needed.
"""

from __future__ import annotations

import math
import os
import pickle
import random
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as TF
from torch.utils.data import Dataset

__all__ = ["DataError", "CifarDataset", "ImageFolderDataset", "DigitsDataset", "load", "detect"]

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(Exception):
    """A data set that cannot be read: the message says what and where."""


def _norm(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


# ----------------------------------------------------------------------------- CIFAR-100


def _cifar_dir(root: str) -> str:
    for d in (os.path.join(root, "cifar-100-python"), root):
        if os.path.isfile(os.path.join(d, "train")) and os.path.isfile(os.path.join(d, "test")):
            return d
    raise DataError(f"no CIFAR-100 data under {root!r}: expected {os.path.join(root, 'cifar-100-python', 'train')} and 'test' pickles")


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise DataError(f"missing file {path!r}") from None
    except Exception as e:
        raise DataError(f"cannot read the pickle {path!r}: {type(e).__name__}: {e}") from None
    if not isinstance(d, dict):
        raise DataError(f"{path!r} does not hold a CIFAR dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


class CifarDataset(Dataset):
    """CIFAR-100 split ``train`` or ``test``; items are (3 x 32 x 32 float, fine label)."""

    num_classes = 100

    def __init__(self, root: str, train: bool, augment: Optional[bool] = None):
        d = _cifar_dir(root)
        raw = _unpickle(os.path.join(d, "train" if train else "test"))
        for key in ("data", "fine_labels"):
            if key not in raw:
                raise DataError(f"{os.path.join(d, 'train' if train else 'test')!r} has no {key!r} entry")
        data = torch.as_tensor(raw["data"], dtype=torch.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"CIFAR 'data' must be N x 3072 uint8, got shape {tuple(data.shape)}")
        self.images = data.view(-1, 3, 32, 32)
        self.labels = torch.as_tensor(raw["fine_labels"], dtype=torch.long)
        if len(self.labels) != len(self.images):
            raise DataError(f"CIFAR: {len(self.images)} images but {len(self.labels)} labels")
        meta_path = os.path.join(d, "meta")
        self.classes: List[str] = _unpickle(meta_path).get("fine_label_names", []) if os.path.isfile(meta_path) else []
        self.augment = train if augment is None else augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float() / 255.0
        if self.augment:
            x = TF.pad(x, (4, 4, 4, 4))
            top, left = random.randint(0, 8), random.randint(0, 8)
            x = x[:, top:top + 32, left:left + 32]
            if random.random() < 0.5:
                x = x.flip(-1)
        return _norm(x, CIFAR_MEAN, CIFAR_STD), self.labels[i]


# ----------------------------------------------------------------------------- ImageFolder


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading image folders needs Pillow: pip install pillow") from None
    return Image


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` files; items are (3 x size x size float, class index)."""

    def __init__(self, root: str, train: bool, size: int = 224, resize: Optional[int] = None):
        if not os.path.isdir(root):
            raise DataError(f"image folder {root!r} does not exist")
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise DataError(f"image folder {root!r} has no class sub-folders")
        self.samples: List[Tuple[str, int]] = []
        for k, c in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), k))
        if not self.samples:
            raise DataError(f"image folder {root!r} has no images ({', '.join(IMG_EXTENSIONS)})")
        self.num_classes = len(self.classes)
        self.train, self.size = train, size
        self.resize = resize if resize is not None else int(round(size * 256 / 224))

    def __len__(self):
        return len(self.samples)

    def _load(self, path):
        Image = _pil()
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except Exception as e:
            raise DataError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from None
        return data.view(h, w, 3).permute(2, 0, 1).float() / 255.0

    def __getitem__(self, i):
        path, label = self.samples[i]
        x = self._load(path)
        _, h, w = x.shape
        if self.train:
            # random-resized crop: area fraction in [0.08, 1], aspect ratio in [3/4, 4/3]
            for _ in range(10):
                area = h * w * random.uniform(0.08, 1.0)
                ar = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
                cw, ch = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
                if 0 < cw <= w and 0 < ch <= h:
                    top, left = random.randint(0, h - ch), random.randint(0, w - cw)
                    break
            else:
                ch = cw = min(h, w)
                top, left = (h - ch) // 2, (w - cw) // 2
            x = x[:, top:top + ch, left:left + cw]
            x = TF.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)[0]
            if random.random() < 0.5:
                x = x.flip(-1)
        else:
            s = self.resize / min(h, w)
            nh, nw = max(self.size, int(round(h * s))), max(self.size, int(round(w * s)))
            x = TF.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
            top, left = (nh - self.size) // 2, (nw - self.size) // 2
            x = x[:, top:top + self.size, left:left + self.size]
        return _norm(x.clamp(0, 1), IMAGENET_MEAN, IMAGENET_STD), label


# ----------------------------------------------------------------------------- digits


def _digits_arrays():
    """(1797 x 64 pixels in 0..16, labels) from the CSV inside scikit-learn, read
    without importing scikit-learn (seconds of import time), else load_digits()."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded digits problem needs scikit-learn: pip install scikit-learn")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
        a = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return a[:, :-1], a[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data, d.target


class DigitsDataset(Dataset):
    """scikit-learn's 8 x 8 digits (1797 images, 10 classes), a fixed 80/20 split; items are (64 float, label)."""

    num_classes = 10

    def __init__(self, train: bool, seed: int = 0):
        x, y = _digits_arrays()
        x = torch.as_tensor(x, dtype=torch.float32) / 16.0
        y = torch.as_tensor(y, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        cut = int(0.8 * len(y))
        idx = perm[:cut] if train else perm[cut:]
        self.x, self.y = (x[idx] - 0.5) / 0.5, y[idx]
        self.classes = [str(i) for i in range(10)]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


# ----------------------------------------------------------------------------- selection


def detect(path: str) -> str:
    """'cifar100' or 'imagenet' from the layout under ``path``."""
    if not os.path.exists(path):
        raise DataError(f"data path {path!r} does not exist")
    try:
        _cifar_dir(path)
        return "cifar100"
    except DataError:
        pass
    if os.path.isdir(os.path.join(path, "train")):
        return "imagenet"
    raise DataError(f"cannot tell the data set under {path!r}: expected cifar-100-python/{{train,test}} or train/<class>/ folders")


def load(dataset: str, path: Optional[str], image_size: int = 224):
    """(train, test) datasets."""
    if dataset == "digits":
        return DigitsDataset(True), DigitsDataset(False)
    if not path:
        raise DataError(f"--data PATH is needed for {dataset}")
    if not os.path.exists(path):
        raise DataError(f"data path {path!r} does not exist")
    if dataset == "cifar100":
        return CifarDataset(path, True), CifarDataset(path, False)
    if dataset == "imagenet":
        val = next((os.path.join(path, v) for v in ("val", "validation", "test") if os.path.isdir(os.path.join(path, v))), None)
        if val is None:
            raise DataError(f"no validation folder under {path!r} (expected val/<class>/...)")
        train, test = ImageFolderDataset(os.path.join(path, "train"), True, image_size), ImageFolderDataset(val, False, image_size)
        if train.classes != test.classes:
            raise DataError(f"train has {len(train.classes)} classes and {val!r} has {len(test.classes)}; they must be the same folders")
        return train, test
    raise DataError(f"unknown data set {dataset!r}; choose digits, cifar100 or imagenet")
