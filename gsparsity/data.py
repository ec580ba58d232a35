"""Data sets and loaders: ImageFolder (ImageNet layout), the demo digits, FakeData.

Train and val both use a DistributedSampler-style split, so every process sees
its own share; val is split without padding so all-reduced metrics count each
image exactly once.

Resuming in the middle of an epoch: the epoch's order depends only on (seed, epoch),
:class:`EpochSampler` can start the epoch after the batches already done, and every
training image draws its random augmentation from a generator seeded by (seed, epoch,
image index) (:class:`SeededSamples`). So an image gets the same crop whichever loader
worker reads it, however many workers there are, and whether or not the run stopped
and resumed in between.

An epoch whose share for a process would end in a batch of a single image leaves that
image out: BatchNorm cannot train on one value per channel (a 1x1 final feature map).
For the same reason, training on batches of one image per process is refused at image
sizes up to 32, where the final feature map is 1x1.

Unreadable image files (truncated, not an image, no permission) are met by
:class:`CheckedImageFolder`: it records them in memory shared with the loader workers
and hands out the next readable image instead, so that batches keep their size; the
training loop then stops naming the file (``--bad-images stop``) or counts them
(``--bad-images skip``).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, get_worker_info
from torch.utils.data.distributed import DistributedSampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from .demo_data import demo_root
from .distributed import DistContext
from .errors import UserError
from .stopping import ignore_stop_signals

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DUMMY_SIZES = {"train": 10_000, "val": 1_000}
DUMMY_CLASSES = 1000
# What PIL raises for a file it cannot decode: OSError (truncated, unidentified, no
# permission), SyntaxError (broken PNG chunks), ValueError, DecompressionBombError.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

ONE_BY_ONE_UP_TO = 32  # image sizes at which a ResNet's last feature map is 1x1 (five halvings)
log = logging.getLogger("gsparsity")


@dataclass(frozen=True)
class DataSettings:
    """What the data pipeline reads of the flags, fixed once they are parsed."""

    data: str | None = None  # an ImageFolder root with train/ and val/, or "demo"
    dummy: bool = False  # FakeData instead of --data
    image_size: int = 224
    batch_size: int = 256  # global: split over the processes
    workers: int = 4
    subset: int | None = None  # N train and N val images, evenly spaced
    seed: int | None = None
    bad_images: str = "stop"  # an unreadable image: "stop" or "skip"
    train: bool = True  # False for --evaluate: no check that a batch can train

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DataSettings":
        return cls(data=args.data, dummy=args.dummy, image_size=args.image_size, batch_size=args.batch_size,
                   workers=args.workers, subset=args.subset, seed=args.seed, bad_images=args.bad_images,
                   train=not args.evaluate)


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


class EpochSampler(DistributedSampler):
    """The training sampler: this process's share of the epoch, shuffled by (seed, epoch),
    without a last lone image (:func:`samples_per_epoch`), optionally starting after
    ``skip`` samples (a resumed epoch); it yields ``(index, augmentation seed)`` pairs
    for :class:`SeededSamples`."""

    def __init__(self, dataset: Dataset, ctx: DistContext, seed: int, augment_seed: int,
                 batch_size: int) -> None:
        super().__init__(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
        self.augment_seed = augment_seed
        self.kept = samples_per_epoch(self.num_samples, batch_size)
        self.skip = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[:self.kept][self.skip:]
        return iter([(index, sample_seed(self.augment_seed, self.epoch, index)) for index in indices])

    def __len__(self) -> int:  # the loader's steps per epoch follow from it
        return max(self.kept - self.skip, 0)


def samples_per_epoch(share: int, batch_size: int) -> int:
    """How many of a process's ``share`` of the images it trains on per epoch: all but a
    last batch of one, which BatchNorm cannot train on when the final feature map is 1x1.
    Every process has the same share (DistributedSampler pads), so all agree on the steps."""
    if batch_size > 1 and share > 1 and share % batch_size == 1:
        return share - 1
    return share


def check_batches_can_train(image_size: int, largest_batch: int, processes: int) -> None:
    """Refuse batches of one image per process where the last feature map is 1x1: BatchNorm
    cannot train on one value per channel (a ResNet halves the image five times)."""
    if largest_batch < 2 and image_size <= ONE_BY_ONE_UP_TO:
        raise UserError(f"each of the {processes} process(es) would train on batches of one image, and at "
                        f"--image-size {image_size} the last feature map is 1x1, where BatchNorm cannot "
                        f"train on one image: give each process at least 2 images (-b {2 * processes} or "
                        f"more, and as many training images), or --image-size {ONE_BY_ONE_UP_TO + 1} or more")


def sample_seed(augment_seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one image in one epoch."""
    entropy = [augment_seed & (2**64 - 1), epoch, index]  # SeedSequence takes no negative numbers
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


class SeededSamples(Dataset):
    """Training samples whose augmentation draws come from their own seed (see the module
    docstring). Only torch's CPU generator is seeded, which is what torchvision's
    transforms use; the caller's generator state is left as it was."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        if isinstance(key, int):  # a plain index, as for any dataset: no seeding
            return self.dataset[key]
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


class ReadFailures:
    """Unreadable images met by this process and its loader workers.

    A table in shared memory, one row per worker (row 0: the process itself), so the
    workers' records reach the main process: [failed reads, first failed index + 1]."""

    def __init__(self, workers: int) -> None:
        self.table = torch.zeros((workers + 1, 2), dtype=torch.int64).share_memory_()
        self.reported = 0  # failed reads already reported, kept by the main process only

    def record(self, index: int) -> None:
        worker = get_worker_info()
        row = 0 if worker is None else worker.id + 1
        self.table[row, 0] += 1
        if self.table[row, 1] == 0:
            self.table[row, 1] = index + 1

    def first_index(self) -> int | None:
        recorded = [int(value) - 1 for value in self.table[:, 1].tolist() if value > 0]
        return min(recorded) if recorded else None

    def unreported_count(self) -> int:
        """Failed reads since the last call."""
        total = int(self.table[:, 0].sum())
        new, self.reported = total - self.reported, total
        return new


class CheckedImageFolder(datasets.ImageFolder):
    """An ImageFolder that survives unreadable files: each one is recorded in
    :attr:`failures` and replaced by the next readable image of the folder.

    ``bad_images``: "stop" or "skip", what the training loop does about them."""

    def __init__(self, root: str, transform: Any, bad_images: str, workers: int) -> None:
        super().__init__(root, transform)
        self.bad_images = bad_images
        self.failures = ReadFailures(workers)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            path, target = self.samples[candidate]
            try:
                image = self.loader(path)
            except UNREADABLE_IMAGE_ERRORS:
                self.failures.record(candidate)
                continue
            return (self.transform(image) if self.transform is not None else image), target
        raise UserError(f"not a single image under {self.root} can be read")

    def unreadable_to_stop_for(self) -> int | None:
        """With --bad-images stop: the index of an unreadable image met so far, else None."""
        return self.failures.first_index() if self.bad_images == "stop" else None

    def unreadable_message(self, index: int) -> str:
        """One line naming the file and what is wrong with it (read again to find out)."""
        path = self.samples[index][0]
        try:
            self.loader(path)
            reason = "it could not be read earlier"
        except UNREADABLE_IMAGE_ERRORS as error:
            reason = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"unreadable image {path}: {reason}; remove or replace it, or pass --bad-images skip "
                f"to leave such files out (with --resume DIR --bad-images skip to continue)")


def image_folder_of(dataset: Any) -> CheckedImageFolder | None:
    """The CheckedImageFolder under a loader or a stack of dataset wrappers, if any."""
    if isinstance(dataset, DataLoader):
        dataset = dataset.dataset
    while not isinstance(dataset, CheckedImageFolder):
        if not hasattr(dataset, "dataset"):
            return None
        dataset = dataset.dataset
    return dataset


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
        imageless = [name for name in classes if not holds_an_image(split_dir / name)]
        if imageless:
            raise UserError(f"--data {root}: class folder {split}/{imageless[0]} holds no image file "
                            f"({', '.join(IMG_EXTENSIONS)})")
        class_sets[split] = classes
    if class_sets["train"] != class_sets["val"]:
        raise UserError(f"--data {root}: train/ and val/ hold different class folders")


def holds_an_image(folder: Path) -> bool:
    """Whether ImageFolder finds an image in ``folder``: a file with an image extension,
    in subfolders too, as ImageFolder looks. Stops at the first one (an ImageNet class
    folder holds 1,300, which ImageFolder lists again anyway)."""
    subfolders = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file() and has_file_allowed_extension(entry.name, IMG_EXTENSIONS):
                return True
            if entry.is_dir():
                subfolders.append(Path(entry.path))
    return any(holds_an_image(subfolder) for subfolder in subfolders)


def build_datasets(settings: DataSettings) -> tuple[Dataset, Dataset, int]:
    """(train, val, number of classes) for --dummy, --data demo or an ImageFolder."""
    if settings.dummy:
        shape = (3, settings.image_size, settings.image_size)
        to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        train = datasets.FakeData(DUMMY_SIZES["train"], shape, DUMMY_CLASSES, to_tensor, random_offset=0)
        val = datasets.FakeData(DUMMY_SIZES["val"], shape, DUMMY_CLASSES, to_tensor, random_offset=1)
        return subset(train, settings.subset), subset(val, settings.subset), DUMMY_CLASSES
    if settings.data == "demo":
        root, augment = demo_root(), "digits"
    else:
        root, augment = Path(settings.data), "imagenet"
        check_image_folder(root)
    train_tf, val_tf = build_transforms(settings.image_size, augment)
    train = CheckedImageFolder(str(root / "train"), train_tf, settings.bad_images, settings.workers)
    val = CheckedImageFolder(str(root / "val"), val_tf, settings.bad_images, settings.workers)
    return subset(train, settings.subset), subset(val, settings.subset), len(train.classes)


def subset(dataset: Dataset, size: int | None) -> Dataset:
    """The first ``size`` items, spread over all classes for ImageFolder (sorted by class)."""
    if size is None or size >= len(dataset):
        return dataset
    stride = len(dataset) / size
    return Subset(dataset, [int(position * stride) for position in range(size)])


def build_loaders(settings: DataSettings, ctx: DistContext) -> Loaders:
    train_set, val_set, num_classes = build_datasets(settings)
    if settings.batch_size < ctx.world_size:
        raise UserError(f"--batch-size {settings.batch_size} is smaller than the number of processes "
                        f"({ctx.world_size}); it is the global batch, split across them")
    if len(val_set) < ctx.world_size:  # a process without a single batch would hang validation
        raise UserError(f"the validation set has {len(val_set)} image(s), fewer than the {ctx.world_size} "
                        f"processes: each needs at least one")
    per_process = settings.batch_size // ctx.world_size
    if per_process * ctx.world_size != settings.batch_size and ctx.is_main:
        log.warning(f"--batch-size {settings.batch_size} does not split evenly over {ctx.world_size} processes: "
                    f"each takes {per_process}, so a step trains on {per_process * ctx.world_size} images")
    seed = settings.seed if settings.seed is not None else 0
    # Unseeded runs still shuffle by seed 0 (as before) but augment differently each run.
    augment_seed = settings.seed if settings.seed is not None else secrets.randbits(62)
    train_sampler = EpochSampler(train_set, ctx, seed, augment_seed, per_process)
    if settings.train:
        check_batches_can_train(settings.image_size, min(per_process, train_sampler.kept), ctx.world_size)
    if train_sampler.kept < train_sampler.num_samples and ctx.is_main:
        log.info("each epoch leaves out one training image per process: its last batch would hold "
                 "only that one, on which BatchNorm cannot train")
    common = dict(
        batch_size=per_process, num_workers=settings.workers, pin_memory=ctx.device.type == "cuda",
        persistent_workers=settings.workers > 0, worker_init_fn=ignore_stop_signals,
    )
    train = DataLoader(SeededSamples(train_set), sampler=train_sampler, generator=torch.Generator(),
                       **common)
    val = DataLoader(val_set, sampler=ShardSampler(len(val_set), ctx.rank, ctx.world_size), **common)
    return Loaders(train=train, val=val, num_classes=num_classes)


def start_epoch(loader: DataLoader, epoch: int, seed: int | None, first_step: int = 0) -> None:
    """Make the epoch's shuffling and augmentation depend only on (seed, epoch), so a
    resumed run draws exactly what an uninterrupted one would; ``first_step``: the
    number of batches of this epoch already done, which the loader leaves out."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip = min(first_step * loader.batch_size, loader.sampler.kept)
    if seed is not None:
        loader.generator.manual_seed(seed * 100_003 + epoch)
