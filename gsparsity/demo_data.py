"""`--data demo`: scikit-learn's handwritten digits, written once as an ImageFolder.

The 1,797 8x8 digit images ship inside scikit-learn, so a fresh machine without
ImageNet can run the whole workflow. They are written as PNG files into
``<cache>/gsparsity/digits/{train,val}/<class>/`` and then read through the very
same ImageFolder code path as ImageNet. Every fifth image (by index) goes to val.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

VAL_EVERY = 5


def cache_root() -> Path:
    base = os.environ.get("GSPARSITY_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(base) if base else Path.home() / ".cache"


def demo_root() -> Path:
    """The demo ImageFolder root, written on first use (atomically, by rename)."""
    root = cache_root() / "gsparsity" / "digits"
    if not (root / "val").is_dir():
        write_digits(root)
    return root


def write_digits(root: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    try:
        for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
            split = "val" if index % VAL_EVERY == 0 else "train"
            folder = staging / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            gray = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
            Image.fromarray(gray, mode="L").save(folder / f"{index:04d}.png")
        try:
            staging.rename(root)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
