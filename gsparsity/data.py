"""Data sets and loaders: ImageFolder (ImageNet layout), the demo digits, FakeData.

Train and val both use a DistributedSampler-style split, so every process sees
its own share; val is split without padding so all-reduced metrics count each
image exactly once.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision import datasets, transforms

from .demo_data import demo_root
from .distributed import DistContext
from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DUMMY_SIZES = {"train": 10_000, "val": 1_000}
DUMMY_CLASSES = 1000


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    num_classes: int


class ShardSampler(Sampler[int]):
    """Every world_size-th index, starting at rank: no padding, no duplicates."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_transforms(image_size: int, augment: str) -> tuple[transforms.Compose, transforms.Compose]:
    """(train, val) transforms. ``augment``: "imagenet" or "digits" (no flips: a flipped
    digit is another symbol)."""
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if augment == "digits":
        train_steps = [transforms.RandomResizedCrop(image_size, scale=(0.7, 1.0), ratio=(0.9, 1.1))]
    else:
        train_steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    train = transforms.Compose(train_steps + [transforms.ToTensor(), normalize])
    val = transforms.Compose([
        transforms.Resize(math.ceil(image_size / 0.875)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        normalize,
    ])
    return train, val


def check_image_folder(root: Path) -> None:
    """Clear errors for the usual ways an ImageNet folder is wrong."""
    if not root.is_dir():
        raise UserError(f"--data {root}: no such folder")
    class_sets = {}
    for split in ("train", "val"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise UserError(f"--data {root}: no '{split}' folder in it (expected {root}/train/<class>/...)")
        classes = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir())
        if not classes:
            raise UserError(f"--data {root}: '{split}' holds no class folders")
        empty = [name for name in classes if not any((split_dir / name).iterdir())]
        if empty:
            raise UserError(f"--data {root}: class folder {split}/{empty[0]} is empty")
        class_sets[split] = classes
    if class_sets["train"] != class_sets["val"]:
        raise UserError(f"--data {root}: train/ and val/ hold different class folders")


def build_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """(train, val, number of classes) for --dummy, --data demo or an ImageFolder."""
    if args.dummy:
        shape = (3, args.image_size, args.image_size)
        to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        train = datasets.FakeData(DUMMY_SIZES["train"], shape, DUMMY_CLASSES, to_tensor, random_offset=0)
        val = datasets.FakeData(DUMMY_SIZES["val"], shape, DUMMY_CLASSES, to_tensor, random_offset=1)
        return subset(train, args.subset), subset(val, args.subset), DUMMY_CLASSES
    if args.data == "demo":
        root, augment = demo_root(), "digits"
    else:
        root, augment = Path(args.data), "imagenet"
        check_image_folder(root)
    train_tf, val_tf = build_transforms(args.image_size, augment)
    train = datasets.ImageFolder(str(root / "train"), train_tf)
    val = datasets.ImageFolder(str(root / "val"), val_tf)
    return subset(train, args.subset), subset(val, args.subset), len(train.classes)


def subset(dataset: Dataset, size: int | None) -> Dataset:
    """The first ``size`` items, spread over all classes for ImageFolder (sorted by class)."""
    if size is None or size >= len(dataset):
        return dataset
    stride = len(dataset) / size
    return Subset(dataset, [int(position * stride) for position in range(size)])


def build_loaders(args: argparse.Namespace, ctx: DistContext) -> Loaders:
    train_set, val_set, num_classes = build_datasets(args)
    if args.batch_size < ctx.world_size:
        raise UserError(f"--batch-size {args.batch_size} is smaller than the number of processes "
                        f"({ctx.world_size}); it is the global batch, split across them")
    per_process = args.batch_size // ctx.world_size
    seed = args.seed if args.seed is not None else 0
    train_sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank,
                                       shuffle=True, seed=seed)
    common = dict(
        batch_size=per_process, num_workers=args.workers, pin_memory=ctx.device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    train = DataLoader(train_set, sampler=train_sampler, generator=torch.Generator(), **common)
    val = DataLoader(val_set, sampler=ShardSampler(len(val_set), ctx.rank, ctx.world_size), **common)
    return Loaders(train=train, val=val, num_classes=num_classes)


def start_epoch(loader: DataLoader, epoch: int, seed: int | None) -> None:
    """Make the epoch's shuffling and augmentation depend only on (seed, epoch), so a
    resumed run draws exactly what an uninterrupted one would."""
    loader.sampler.set_epoch(epoch)
    if seed is not None:
        loader.generator.manual_seed(seed * 100_003 + epoch)
