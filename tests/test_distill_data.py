"""Data loaders of the distillation harness on tiny fake data sets written in the
real on-disk formats (CIFAR-100 pickles, an ImageFolder tree of JPEG/PNG files)."""

import os
import pickle

import numpy as np
import pytest
import torch

from rcka_kernels.distill import data as D

PIL = pytest.importorskip("PIL.Image")


def _write_cifar(root, n_train=10, n_test=4, bytes_keys=False):
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        entry = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": f"{split} batch 1 of 1",
                 "fine_labels": list(rng.integers(0, 100, n)), "coarse_labels": list(rng.integers(0, 20, n)),
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        if bytes_keys:
            entry = {k.encode(): v for k, v in entry.items()}
        with open(os.path.join(d, split), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(d, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]}, f)
    return d


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar_pickles(tmp_path, bytes_keys):
    d = _write_cifar(str(tmp_path), bytes_keys=bytes_keys)
    with open(os.path.join(d, "train"), "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    raw = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    ds = D.CifarDataset(str(tmp_path), train=True, augment=False)
    assert len(ds) == 10 and ds.num_classes == 100 and ds.classes[3] == "c3"
    x, y = ds[7]
    assert x.shape == (3, 32, 32) and y.item() == raw["fine_labels"][7]
    # channel-major rows: pixel (c, r, k) is data[i, c*1024 + r*32 + k], then normalised
    c, r, k = 2, 5, 17
    want = (raw["data"][7, c * 1024 + r * 32 + k] / 255.0 - D.CIFAR_MEAN[c]) / D.CIFAR_STD[c]
    assert abs(x[c, r, k].item() - want) < 1e-6
    # augmentation keeps the shape and the label; the test split is not augmented
    xa, ya = D.CifarDataset(d, train=True)[7]
    assert xa.shape == (3, 32, 32) and ya == y
    assert len(D.CifarDataset(d, train=False)) == 4
    assert D.detect(str(tmp_path)) == "cifar100"


def test_cifar_errors(tmp_path):
    with pytest.raises(D.DataError, match="no CIFAR-100 data"):
        D.CifarDataset(str(tmp_path), train=True)
    d = _write_cifar(str(tmp_path))
    with open(os.path.join(d, "train"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(D.DataError, match="cannot read the pickle"):
        D.CifarDataset(str(tmp_path), train=True)


def _write_folder(root, classes=("dog", "cat"), per_class=3, size=(20, 30)):
    colors = {}
    for split in ("train", "val"):
        for ci, c in enumerate(classes):
            os.makedirs(os.path.join(root, split, c))
            for i in range(per_class):
                color = (40 * ci + 10 * i, 100, 200 - 30 * i)
                ext = ".JPEG" if i % 2 == 0 else ".png"
                p = os.path.join(root, split, c, f"{c}_{i}{ext}")
                PIL.new("RGB", size, color).save(p, quality=100) if ext == ".JPEG" else PIL.new("RGB", size, color).save(p)
                colors[p] = color
    return colors


def test_image_folder(tmp_path):
    colors = _write_folder(str(tmp_path))
    train, test = D.load("imagenet", str(tmp_path), image_size=16)
    assert train.classes == ["cat", "dog"] and train.num_classes == 2 and len(train) == 6 and len(test) == 6
    for ds in (train, test):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 16, 16)
            path, label = ds.samples[i]
            assert y == label == ds.classes.index(os.path.basename(os.path.dirname(path)))
    # a flat-colour image stays that colour through resize + centre crop (JPEG within a few levels)
    for i in range(len(test)):
        x, _ = test[i]
        color = torch.tensor(colors[test.samples[i][0]], dtype=torch.float32) / 255.0
        want = (color - torch.tensor(D.IMAGENET_MEAN)) / torch.tensor(D.IMAGENET_STD)
        torch.testing.assert_close(x.mean((1, 2)), want, atol=0.05, rtol=0)
    assert D.detect(str(tmp_path)) == "imagenet"


def test_image_folder_errors(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.load("imagenet", str(tmp_path / "nope"))
    os.makedirs(tmp_path / "train" / "a")
    with pytest.raises(D.DataError, match="no images"):
        D.ImageFolderDataset(str(tmp_path / "train"), True, 16)
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(D.DataError, match="cannot read image"):
        D.ImageFolderDataset(str(tmp_path / "train"), True, 16)[0]
    with pytest.raises(D.DataError, match="no validation folder"):
        D.load("imagenet", str(tmp_path))


def test_digits_split():
    tr, te = D.DigitsDataset(True), D.DigitsDataset(False)
    assert len(tr) + len(te) == 1797 and tr.num_classes == 10
    assert tr[0][0].shape == (64,)
    assert set(tr.y.tolist()) == set(range(10))
