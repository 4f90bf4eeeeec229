"""Training data for ``neural-mechanics demo`` and ``train``.

* ``generated``: learnable synthetic images, built in memory from a seed (no download).  Each class is
  an oriented sinusoidal grating with its own orientation, spatial frequency and colour, shown through
  a Gaussian window at a random position, with random phase, contrast, background and pixel noise.  A
  small CNN learns it (the loss falls steadily over a few hundred steps) but not instantly.
* a CIFAR-10 / CIFAR-100 folder in torchvision's layout (``cifar-10-batches-py`` /
  ``cifar-100-python``), read with ``torchvision.datasets`` and ``download=False``;
* an ImageFolder tree (one sub-folder per class), either directly or under ``train/`` (and ``val/``),
  which covers Tiny ImageNet (its ``val/images`` + ``val_annotations.txt`` layout is read too).

``load_data`` returns a :class:`DataSpec`; every error names the path and the layout it expected.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

CIFAR_DIRS = {"cifar-10-batches-py": ("CIFAR10", 10), "cifar-100-python": ("CIFAR100", 100)}
CIFAR_STATS = {"CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               "CIFAR100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

LAYOUTS = """expected one of:
  generated                      built-in synthetic images (no files needed)
  DIR/cifar-10-batches-py/...    CIFAR-10 as torchvision stores it (data_batch_1..5, test_batch)
  DIR/cifar-100-python/...       CIFAR-100 as torchvision stores it (train, test, meta)
  DIR/train/CLASS/**/IMAGE       an ImageFolder tree, e.g. Tiny ImageNet (tiny-imagenet-200/);
                                 optional DIR/val/CLASS/... or DIR/val/images + val_annotations.txt
  DIR/CLASS/**/IMAGE             an ImageFolder tree without a train/ level"""


@dataclass
class DataSpec:
    """What ``load_data`` found: the datasets and their shape."""
    name: str                 # "generated", "CIFAR10", "CIFAR100", "ImageFolder"
    train: torch.utils.data.Dataset
    test: Optional[torch.utils.data.Dataset]
    num_classes: int
    in_channels: int
    image_size: int
    root: Optional[str] = None


# ---- generated images ------------------------------------------------------------------------------
def generate_images(num_samples: int, num_classes: int = 10, image_size: int = 32, channels: int = 3,
                    seed: int = 0, noise: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Synthetic labelled images, a pure function of its arguments: ``(x [N, C, S, S] float32, y [N])``.

    Class ``c`` has a grating orientation ``π·c/num_classes`` (jittered by ±6°), one of two spatial
    frequencies and a colour; the grating is seen through a Gaussian window at a random place, with a
    random phase, contrast and background, plus pixel noise of standard deviation ``noise``.  Neighbouring
    classes differ by 18° of orientation (for 10 classes), so the task needs learned oriented filters.
    Values are roughly zero-mean with unit variance, like normalised natural images.
    """
    if num_samples < 1 or num_classes < 2 or image_size < 4 or channels < 1:
        raise ValueError("generate_images: need num_samples >= 1, num_classes >= 2, image_size >= 4, channels >= 1")
    gen = torch.Generator().manual_seed(int(seed))
    N, S = num_samples, image_size
    y = torch.arange(N) % num_classes
    y = y[torch.randperm(N, generator=gen)]

    def rand(*shape):
        return torch.rand(shape, generator=gen)

    angle = math.pi * y / num_classes + (rand(N) - 0.5) * math.radians(12)
    cycles = torch.where(y % 2 == 0, 3.0, 5.0) * S / 32   # cycles across the image: 3 or 5 per 32 pixels
    phase = rand(N) * 2 * math.pi
    contrast = 0.8 + 0.6 * rand(N)
    cx, cy = (0.3 + 0.4 * rand(N)) * S, (0.3 + 0.4 * rand(N)) * S
    width = (0.22 + 0.08 * rand(N)) * S

    coords = torch.arange(S, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")          # [S, S]
    xx, yy = xx[None], yy[None]
    u = (xx - cx[:, None, None]) * torch.cos(angle)[:, None, None] + (yy - cy[:, None, None]) * torch.sin(angle)[:, None, None]
    grating = torch.sin(2 * math.pi * cycles[:, None, None] * u / S + phase[:, None, None])
    window = torch.exp(-((xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2) / (2 * width[:, None, None] ** 2))
    pattern = contrast[:, None, None] * grating * window                        # [N, S, S]

    # A fixed colour per class (from a generator of its own, so it does not depend on N), blurred by
    # a random per-sample tint: colour helps but does not give the class away on its own.
    palette = torch.rand((num_classes, channels), generator=torch.Generator().manual_seed(int(seed) + 7919)) * 2 - 1
    colour = 0.5 * palette[y] + (rand(N, channels) - 0.5)
    colour = 0.5 + 0.5 * colour.abs()
    background = (rand(N, channels) - 0.5) * 0.6
    x = background[:, :, None, None] + colour[:, :, None, None] * pattern[:, None] * 0.8
    x = x + noise * torch.randn((N, channels, S, S), generator=gen)
    return x.float().contiguous(), y.long()


class TensorImages(torch.utils.data.TensorDataset):
    """In-memory images and labels (what ``generated`` data is), indexable like any dataset."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        super().__init__(x, y)
        self.x, self.y = x, y


def generated_data(train_samples: int = 6144, test_samples: int = 1024, num_classes: int = 10,
                   image_size: int = 32, channels: int = 3, seed: int = 0) -> DataSpec:
    """Train and test sets of :func:`generate_images` (the test set from a different seed)."""
    xtr, ytr = generate_images(train_samples, num_classes, image_size, channels, seed=seed)
    test = None
    if test_samples > 0:
        xte, yte = generate_images(test_samples, num_classes, image_size, channels, seed=seed + 1_000_003)
        test = TensorImages(xte, yte)
    return DataSpec("generated", TensorImages(xtr, ytr), test, num_classes, channels, image_size)


# ---- folders ---------------------------------------------------------------------------------------
def _transforms(train: bool, image_size: int, stats, resize: bool):
    from torchvision import transforms as T
    steps = [T.Resize((image_size, image_size))] if resize else []
    if train:
        # The paper's augmentation (THEORY §8): random crop with padding 4 and horizontal flips.
        steps += [T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip()]
    steps += [T.ToTensor(), T.Normalize(*stats)]
    return T.Compose(steps)


def _is_class_tree(path: str) -> bool:
    """True when ``path`` has sub-folders and at least one image somewhere below the first one."""
    if not os.path.isdir(path):
        return False
    subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not subdirs:
        return False
    for dirpath, _, files in os.walk(os.path.join(path, subdirs[0])):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False


class TinyImageNetVal(torch.utils.data.Dataset):
    """Tiny ImageNet's validation split: ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``."""

    def __init__(self, val_dir: str, class_to_idx: dict, transform=None):
        self.transform = transform
        self.samples = []
        with open(os.path.join(val_dir, "val_annotations.txt")) as f:
            for line in f:
                parts = line.strip().split("\t")
                if len(parts) >= 2 and parts[1] in class_to_idx:
                    self.samples.append((os.path.join(val_dir, "images", parts[0]), class_to_idx[parts[1]]))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.samples[i]
        with Image.open(path) as img:
            img = img.convert("RGB")
        return (self.transform(img) if self.transform else img), label


def _image_size_of(dataset) -> int:
    from PIL import Image
    with Image.open(dataset.samples[0][0]) as img:
        return max(img.size)


def load_data(data: str, *, image_size: Optional[int] = None, seed: int = 0, train_samples: int = 6144,
              test_samples: int = 1024, num_classes: int = 10, channels: int = 3) -> DataSpec:
    """The datasets named by ``data``: ``"generated"`` or a folder (see the module docstring).

    ``image_size`` resizes folder images (default: their own size, e.g. 64 for Tiny ImageNet, 32 for
    CIFAR); for generated data it is the size drawn (default 32).  ``num_classes``, ``channels``,
    ``train_samples``, ``test_samples`` and ``seed`` apply to generated data only.
    Raises FileNotFoundError (no such path / nothing recognisable in it) or ValueError (bad argument),
    naming the path and the layouts expected.
    """
    if data == "generated":
        return generated_data(train_samples, test_samples, num_classes, image_size or 32, channels, seed)
    root = os.path.abspath(os.path.expanduser(data))
    if not os.path.exists(root):
        raise FileNotFoundError(f"data folder {root} does not exist; {LAYOUTS}")
    if not os.path.isdir(root):
        raise ValueError(f"--data {root} is a file, not a folder; {LAYOUTS}")

    # CIFAR: DIR holds cifar-10-batches-py, or DIR is that folder itself.
    for sub, (cls_name, classes) in CIFAR_DIRS.items():
        base = root if os.path.basename(root.rstrip("/")) == sub else os.path.join(root, sub)
        if os.path.isdir(base):
            return _load_cifar(os.path.dirname(base), cls_name, classes, image_size)

    train_dir = os.path.join(root, "train")
    if _is_class_tree(train_dir):
        return _load_image_folder(root, train_dir, os.path.join(root, "val"), image_size)
    if _is_class_tree(root) and not os.path.isdir(train_dir):
        return _load_image_folder(root, root, None, image_size)
    raise FileNotFoundError(f"no dataset recognised in {root} (contents: "
                            f"{', '.join(sorted(os.listdir(root))[:8]) or 'empty'}); {LAYOUTS}")


def _load_cifar(parent: str, cls_name: str, classes: int, image_size: Optional[int]) -> DataSpec:
    import torchvision
    size = image_size or 32
    stats = CIFAR_STATS[cls_name]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train = cls(parent, train=True, download=False, transform=_transforms(True, size, stats, size != 32))
        test = cls(parent, train=False, download=False, transform=_transforms(False, size, stats, size != 32))
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        sub = [k for k, v in CIFAR_DIRS.items() if v[0] == cls_name][0]
        raise FileNotFoundError(f"{cls_name} in {parent}/{sub} is incomplete or corrupted ({exc}); "
                                f"torchvision's layout is {parent}/{sub}/ with the files of the official "
                                "python archive (checked by md5). This command never downloads.") from None
    return DataSpec(cls_name, train, test, classes, 3, size, parent)


def _load_image_folder(root: str, train_dir: str, val_dir: Optional[str], image_size: Optional[int]) -> DataSpec:
    import torchvision
    probe = torchvision.datasets.ImageFolder(train_dir)
    if len(probe.samples) == 0:
        raise FileNotFoundError(f"no images under {train_dir}; {LAYOUTS}")
    native = _image_size_of(probe)
    size = image_size or native
    resize = size != native
    train = torchvision.datasets.ImageFolder(train_dir, transform=_transforms(True, size, IMAGENET_STATS, resize))
    test = None
    evaluate = _transforms(False, size, IMAGENET_STATS, resize)
    if val_dir and os.path.isfile(os.path.join(val_dir, "val_annotations.txt")):
        test = TinyImageNetVal(val_dir, train.class_to_idx, evaluate)
    elif val_dir and _is_class_tree(val_dir):
        test = torchvision.datasets.ImageFolder(val_dir, transform=evaluate)
        if test.class_to_idx != train.class_to_idx:
            raise ValueError(f"{val_dir} has other classes than {train_dir} "
                             f"({len(test.classes)} vs {len(train.classes)})")
    return DataSpec("ImageFolder", train, test, len(train.classes), 3, size, root)


# ---- batches ---------------------------------------------------------------------------------------
def batches(spec: DataSpec, batch_size: int, seed: int, workers: int = 0, train: bool = True,
            drop_last: bool = True, pin_memory: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches of the train set (``train=True``) or one pass over the test set.

    In-memory data is indexed directly (a DataLoader would only add per-sample overhead); folders go
    through a ``DataLoader`` with ``workers`` processes (``pin_memory`` for fast copies to a GPU).
    Shuffling is deterministic from ``seed``.
    """
    dataset = spec.train if train else spec.test
    if dataset is None:
        return
    gen = torch.Generator().manual_seed(int(seed))
    if isinstance(dataset, TensorImages):
        n = len(dataset)
        if train and batch_size > n:
            raise ValueError(f"batch size {batch_size} is larger than the {n} training samples")
        while True:
            order = torch.randperm(n, generator=gen) if train else torch.arange(n)
            stop = n - batch_size + 1 if (train and drop_last) else n
            for i in range(0, stop, batch_size):
                idx = order[i:i + batch_size]
                yield dataset.x[idx], dataset.y[idx]
            if not train:
                return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=train, generator=gen,
                                         num_workers=workers, drop_last=train and drop_last,
                                         persistent_workers=train and workers > 0, pin_memory=pin_memory)
    while True:
        yield from loader
        if not train:
            return
