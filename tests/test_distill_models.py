"""Models of the distillation harness: torchvision-compatible names and sizes,
CRD-style CIFAR ResNets, and checkpoint loading errors."""

import pytest
import torch

from rcka_kernels.distill import models as M
from rcka_kernels.distill.train import DistillError, load_checkpoint


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_imagenet_resnets_match_torchvision_sizes_and_names():
    # torchvision's published parameter counts (1000 classes)
    assert _count(M.build("resnet18", 1000)) == 11689512
    m = M.build("resnet34", 1000)
    assert _count(m) == 21797672
    keys = set(m.state_dict())
    for k in ("conv1.weight", "bn1.running_var", "bn1.num_batches_tracked", "layer1.2.conv2.weight",
              "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean", "layer4.2.bn2.bias", "fc.weight", "fc.bias"):
        assert k in keys
    assert "layer1.0.downsample.0.weight" not in keys
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("name,blocks,width", [("resnet20", 3, 64), ("resnet56", 9, 64), ("resnet8x4", 1, 256), ("resnet32x4", 5, 256)])
def test_cifar_resnets(name, blocks, width):
    m = M.build(name, 100)
    assert len(m.layer1) == len(m.layer3) == blocks and m.fc.in_features == width
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 100) and m.features(x).shape == (2, width)


def test_checkpoint_loading(tmp_path):
    src, dst = M.build("resnet8x4", 10), M.build("resnet8x4", 10)
    p = tmp_path / "t.pth"
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}, p)
    load_checkpoint(dst, str(p))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_checkpoint_errors(tmp_path):
    m = M.build("resnet8x4", 10)
    with pytest.raises(DistillError, match="does not exist"):
        load_checkpoint(m, str(tmp_path / "none.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(DistillError, match="cannot read"):
        load_checkpoint(m, str(bad))
    other = tmp_path / "other.pth"
    torch.save(M.build("resnet8x4", 100).state_dict(), other)
    with pytest.raises(DistillError, match="100 classes but the data set has 10"):
        load_checkpoint(m, str(other))
    wrong = tmp_path / "wrong.pth"
    torch.save(M.build("resnet20", 10).state_dict(), wrong)
    with pytest.raises(DistillError, match="does not fit"):
        load_checkpoint(m, str(wrong))
