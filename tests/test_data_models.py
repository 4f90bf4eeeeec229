"""Built-in data, dataset folders and their errors, and the model zoo of ``demo`` / ``train``."""
import os

import pytest
import torch
import torch.nn as nn

from neural_mechanics_ext.app.data import batches, generate_images, load_data
from neural_mechanics_ext.app.models import MODELS, build_model, demo_net, vgg16, vgg16_bn


# ---- generated data ---------------------------------------------------------------------------------
def test_generated_images_are_deterministic_balanced_and_normalised():
    x, y = generate_images(200, num_classes=10, image_size=16, seed=3)
    x2, y2 = generate_images(200, num_classes=10, image_size=16, seed=3)
    assert x.shape == (200, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, generate_images(200, num_classes=10, image_size=16, seed=4)[0])
    assert torch.bincount(y, minlength=10).tolist() == [20] * 10
    assert abs(float(x.mean())) < 0.1 and 0.5 < float(x.std()) < 2


def test_generated_classes_differ_in_their_mean_orientation_energy():
    # A class signal that a linear read-out of oriented energy sees: the classes are separable in
    # principle (the demo shows a CNN learns them), not label noise.
    x, y = generate_images(400, num_classes=4, image_size=16, noise=0.0, seed=0)
    gray = x.mean(1)
    dx = (gray[:, :, 1:] - gray[:, :, :-1]).pow(2).mean((1, 2))
    dy = (gray[:, 1:, :] - gray[:, :-1, :]).pow(2).mean((1, 2))
    ratio = torch.stack([(dx / (dx + dy))[y == c].mean() for c in range(4)])
    assert ratio.max() - ratio.min() > 0.3


def test_generated_batches_cover_the_data_and_are_reproducible():
    spec = load_data("generated", train_samples=64, test_samples=16, image_size=8, seed=1)
    it = batches(spec, 16, seed=5)
    first = [next(it)[1] for _ in range(4)]
    again = batches(spec, 16, seed=5)
    assert all(torch.equal(a, next(again)[1]) for a in first)
    assert sum(len(b) for b in first) == 64
    test = list(batches(spec, 10, seed=0, train=False))
    assert sum(len(b[1]) for b in test) == 16


# ---- folders ----------------------------------------------------------------------------------------
def test_missing_data_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="(?s)nowhere does not exist.*expected one of"):
        load_data(str(missing))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load_data(str(tmp_path / "file.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="(?s)no dataset recognised.*cifar-10-batches-py"):
        load_data(str(empty))


def test_broken_cifar_folder_names_the_layout(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(FileNotFoundError, match="CIFAR10.*incomplete or corrupted.*never downloads"):
        load_data(str(tmp_path))


def make_tiny_imagenet(root, classes=("n01", "n02"), per_class=6, size=8):
    """A miniature of Tiny ImageNet's layout: train/<wnid>/images/*.JPEG, val/images + annotations."""
    from PIL import Image
    gen = torch.Generator().manual_seed(0)
    lines = []
    for c in classes:
        d = root / "train" / c / "images"
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = (torch.rand(size, size, 3, generator=gen) * 255).byte().numpy()
            Image.fromarray(arr).save(d / f"{c}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    for i, c in enumerate(classes * 2):
        arr = (torch.rand(size, size, 3, generator=gen) * 255).byte().numpy()
        Image.fromarray(arr).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{c}\t0\t0\t{size}\t{size}")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_tiny_imagenet_layout(tmp_path):
    root = make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    spec = load_data(str(root))
    assert (spec.name, spec.num_classes, spec.image_size, spec.in_channels) == ("ImageFolder", 2, 8, 3)
    assert len(spec.train) == 12 and len(spec.test) == 4
    x, y = next(batches(spec, 4, seed=0))
    assert x.shape == (4, 3, 8, 8)
    resized = load_data(str(root), image_size=12)
    assert resized.train[0][0].shape == (3, 12, 12)


def test_plain_image_folder_without_train_level(tmp_path):
    root = make_tiny_imagenet(tmp_path / "t") / "train"
    spec = load_data(str(root))
    assert spec.num_classes == 2 and spec.test is None


# ---- models -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_and_runs(name):
    model = build_model(name, num_classes=7, in_channels=3, image_size=32)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'vgg19'; known models: demo, vgg16, vgg16_bn, resnet18, mlp"):
        build_model("vgg19", 10)


def test_paper_vgg16_for_tiny_imagenet():
    """THEORY §8: 13 3x3 convs with bias, classifier 2048→1024→1024→200, the paper's init."""
    torch.manual_seed(0)
    for make, bn in ((vgg16, False), (vgg16_bn, True)):
        m = make(num_classes=200, image_size=64)
        convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
        assert len(convs) == 13 and all(c.bias is not None and c.kernel_size == (3, 3) for c in convs)
        assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
        assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == (13 if bn else 0)
        linears = [x for x in m.modules() if isinstance(x, nn.Linear)]
        assert [(l.in_features, l.out_features) for l in linears] == [(2048, 1024), (1024, 1024), (1024, 200)]
        assert all(float(l.bias.detach().abs().max()) == 0 for l in linears + convs)
        assert abs(float(linears[1].weight.detach().std()) - 0.01) < 5e-4
        # kaiming normal, fan_out: std = sqrt(2 / (out * 9))
        assert abs(float(convs[2].weight.detach().std()) / (2 / (128 * 9)) ** 0.5 - 1) < 0.05


def test_demo_net_has_all_three_symmetries():
    from neural_mechanics_ext.symmetry import find_symmetries
    families = find_symmetries(demo_net(), torch.randn(8, 3, 32, 32))
    kinds = [f.kind for f in families]
    assert kinds.count("scale") == 5          # one per conv, in front of BN
    assert kinds.count("rescale") == 7        # 5 BN affines → next layer, fc1 → fc2, fc2 → fc3
    assert kinds.count("translation") == 7    # 5 conv biases in front of BN, classifier columns and bias
    names = [f.name for f in families]
    assert "classifier.fc1 → classifier.fc2 (rescale)" in names
    assert "features.bn3_1 → classifier.fc1 (rescale)" in names
