"""Models for ``neural-mechanics demo`` and ``train``.

* ``demo``: a small VGG-style network that has all three symmetries: conv → BatchNorm → ReLU blocks
  (scale families, and rescale families from each BN affine to the next layer), a ReLU MLP head
  without BN (rescale families) and a softmax classifier (translation families).
* ``vgg16`` / ``vgg16_bn``: the paper's VGG-16 (THEORY.md §8): 13 3×3 convs with bias, max-pooling
  after blocks of 2, 2, 3, 3, 3, classifier Linear(512·(S/32)², 1024)–ReLU–Dropout–Linear(1024, 1024)–
  ReLU–Dropout–Linear(1024, classes) (2048 inputs for 64×64 Tiny ImageNet), the paper's init.
* ``resnet18``: torchvision's, untrained (``weights=None``).
* ``mlp``: Flatten → Linear–ReLU–Linear–ReLU–Linear.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def init_paper(model: nn.Module) -> nn.Module:
    """The paper's initialisation (THEORY §8): conv kaiming-normal (fan_out, ReLU), bias 0; BN weight 1,
    bias 0; Linear N(0, 0.01²), bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


class VGG(nn.Module):
    """VGG with named layers (``features.conv3_2``, ``features.bn3_2``, ``classifier.fc1``, ...), so the
    symmetry families and the figures carry readable layer names."""

    def __init__(self, cfg: Sequence, num_classes: int, in_channels: int = 3, image_size: int = 64,
                 batch_norm: bool = False, hidden: int = 1024, dropout: float = 0.5,
                 bn_eps: float = 1e-5, head_bn: bool = False):
        super().__init__()
        layers, c, block, index, size = [], in_channels, 1, 1, image_size
        for v in cfg:
            if v == "M":
                layers.append((f"pool{block}", nn.MaxPool2d(2)))
                block, index, size = block + 1, 1, size // 2
                continue
            layers.append((f"conv{block}_{index}", nn.Conv2d(c, v, 3, padding=1)))
            if batch_norm:
                layers.append((f"bn{block}_{index}", nn.BatchNorm2d(v, eps=bn_eps)))
            layers.append((f"relu{block}_{index}", nn.ReLU(inplace=True)))
            c, index = v, index + 1
        if size < 1:
            raise ValueError(f"image size {image_size} is too small for {sum(v == 'M' for v in cfg)} poolings")
        self.features = nn.Sequential(OrderedDict(layers))
        head = [("fc1", nn.Linear(c * size * size, hidden)), ("relu1", nn.ReLU(inplace=True))]
        if dropout:
            head.append(("drop1", nn.Dropout(dropout)))
        head += [("fc2", nn.Linear(hidden, hidden)), ("relu2", nn.ReLU(inplace=True))]
        if dropout:
            head.append(("drop2", nn.Dropout(dropout)))
        head.append(("fc3", nn.Linear(hidden, num_classes)))
        self.classifier = nn.Sequential(OrderedDict(head))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16(num_classes: int = 200, in_channels: int = 3, image_size: int = 64, bn_eps: float = 1e-5) -> nn.Module:
    """The paper's VGG-16 without BatchNorm (rescale + translation symmetries)."""
    return init_paper(VGG(VGG16_CFG, num_classes, in_channels, image_size))


def vgg16_bn(num_classes: int = 200, in_channels: int = 3, image_size: int = 64, bn_eps: float = 1e-5) -> nn.Module:
    """The paper's VGG-16 with BatchNorm after every conv (scale, rescale and translation symmetries)."""
    return init_paper(VGG(VGG16_CFG, num_classes, in_channels, image_size, batch_norm=True, bn_eps=bn_eps))


def demo_net(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, bn_eps: float = 1e-5,
             widths: Sequence[int] = (16, 32, 64), hidden: Sequence[int] = (128, 64)) -> nn.Module:
    """The demo network: VGG-style conv–BN–ReLU blocks (two convs, one, one; max-pooling after each),
    then a ReLU MLP head without BN and a softmax classifier.  About 0.18 M parameters for 32×32 inputs.

    Families: one scale family per conv (its filters, in front of BN), a rescale family from each BN
    affine to the next conv (or to fc1 through the flatten), rescale families fc1 → fc2 → fc3, and the
    translation families of the classifier (its columns, its bias) and of each conv bias (which BN's
    mean subtraction makes translation-invariant).
    """
    cfg = [widths[0], widths[0], "M", widths[1], widths[1], "M", widths[2], "M"]
    net = VGG(cfg, num_classes, in_channels, image_size, batch_norm=True, hidden=hidden[0], dropout=0.0,
              bn_eps=bn_eps)
    # A narrower second hidden layer than VGG's (hidden, hidden): a few more distinct depths to colour.
    net.classifier = nn.Sequential(OrderedDict([
        ("fc1", net.classifier.fc1), ("relu1", nn.ReLU(inplace=True)),
        ("fc2", nn.Linear(hidden[0], hidden[1])), ("relu2", nn.ReLU(inplace=True)),
        ("fc3", nn.Linear(hidden[1], num_classes))]))
    # Default (kaiming-uniform) init for the head: the paper's N(0, 0.01) makes a deep ReLU head start
    # almost silent, which a few hundred steps cannot recover from; the convs keep kaiming-normal.
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


def mlp(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, bn_eps: float = 1e-5,
        hidden: Sequence[int] = (512, 256)) -> nn.Module:
    """Flatten → Linear–ReLU per hidden width → Linear (rescale and translation symmetries only)."""
    layers, d = [("flatten", nn.Flatten())], in_channels * image_size * image_size
    for i, h in enumerate(hidden, 1):
        layers += [(f"fc{i}", nn.Linear(d, h)), (f"relu{i}", nn.ReLU(inplace=True))]
        d = h
    layers.append((f"fc{len(hidden) + 1}", nn.Linear(d, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, bn_eps: float = 1e-5) -> nn.Module:
    """torchvision's ResNet-18, untrained; the stem takes ``in_channels``.  ``bn_eps`` is set on every BN."""
    import torchvision
    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = bn_eps
    return net


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "demo": demo_net, "vgg16": vgg16, "vgg16_bn": vgg16_bn, "resnet18": resnet18, "mlp": mlp}


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                bn_eps: Optional[float] = None) -> nn.Module:
    """A fresh model by name (``MODELS``): ``demo``, ``vgg16``, ``vgg16_bn``, ``resnet18``, ``mlp``.

    ``bn_eps`` overrides BatchNorm's eps (tiny values make the scale symmetries exact, THEORY D12).
    Raises ValueError listing the known names for an unknown one.
    """
    key = name.lower().replace("-", "_")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[key](num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                       bn_eps=1e-5 if bn_eps is None else bn_eps)
