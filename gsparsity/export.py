"""Deployable files of a compressed model: TorchScript and ONNX, checked against PyTorch.

The compressed model is rebuilt from the mask that travels inside its own checkpoint
(``mask_from_record`` + ``build_pruned_resnet``), so no registry is needed: a
search's ``small_model_*.pth.tar`` and a retrain's ``checkpoint.pth.tar`` /
``model_best.pth.tar`` both carry ``arch``, ``scope``, ``num_classes``, ``mask`` and
``state_dict``. The original's folders are read as well (``original_files``): a search's
``small_model_<scope>_<threshold>.pth.tar`` with the ``mask_<threshold>.npy`` beside it, and
a retrain's checkpoint with the mask of its ``--baseline_model``, found in the registry.

Every format is first exported to bytes, then run on random batches (TorchScript by
``torch.jit.load``, ONNX by onnxruntime on the CPU) and compared with the eval-mode
PyTorch model; only when every format agrees to ``RELATIVE_TOLERANCE`` are the files
written, atomically, and never over an existing file unless ``force`` is given.
The checks use two batch sizes, the export's and one more, because the ONNX file has
a dynamic batch axis and the TorchScript trace must not have frozen the batch size.

With ``fuse_bn`` the files hold the model with every BatchNorm folded into its conv
(:func:`gsparsity.inference.fuse_bn`, the inference form ``bench/latency.py`` times),
still checked against the unfolded PyTorch model.

Also a command: ``python export.py PATH [--format torchscript onnx] [--out DIR] [--fuse-bn]``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import io
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .checkpoint import atomic_save, atomic_write_bytes, load_checkpoint, refuse_to_replace
from .errors import UserError
from .experiment import RUN_INFO
from .inference import fuse_bn
from .masks import Mask, mask_from_record, mask_to_record, save_mask
from .original_files import (is_original_retrain_checkpoint, is_original_small_model, load_original_retrain_checkpoint,
                             load_original_small_model, original_search_small_model)
from .pruned_resnet import build_pruned_resnet
from .registry import SMALL_MODEL_PATTERN, mask_file, searched_small_model, small_model_file
from .training import BEST, CHECKPOINT

FORMATS = ("torchscript", "onnx")
FILE_SUFFIXES = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}
RELATIVE_TOLERANCE = 1e-4  # largest accepted |exported - PyTorch| / max |PyTorch|
ONNX_OPSET = 17  # run by every onnxruntime release since 1.14
INPUT_NAME, OUTPUT_NAME = "images", "logits"
REQUIRED_KEYS = ("arch", "scope", "num_classes", "mask", "state_dict")
EXIT_USER_ERROR, EXIT_MISMATCH = 2, 1
# Warnings of the exporters that say nothing about this model:
QUIET_WARNINGS = (
    r".*legacy TorchScript-based ONNX export",  # chosen on purpose: it needs no onnxscript
    r"`torch\.jit\.\w+` is deprecated",  # trace/save/load: TorchScript is what was asked for
    # index_add of the all_conv block: its indices (kept_indices) never repeat.
    r".*does not support duplicated values in 'index' field",
)


class ExportMismatch(RuntimeError):
    """An exported model computes something else than the PyTorch model."""


@dataclass(frozen=True)
class Deviation:
    """How far one exported format is from PyTorch on one random batch."""

    export_format: str
    batch_size: int
    max_abs: float
    relative: float  # max_abs / max |PyTorch output|

    @property
    def acceptable(self) -> bool:
        return self.relative <= RELATIVE_TOLERANCE  # False for NaN too

    def describe(self) -> str:
        return (f"{self.export_format}, batch of {self.batch_size}: max abs deviation "
                f"{self.max_abs:.3g} (relative {self.relative:.3g})")


@dataclass(frozen=True)
class ExportResult:
    files: dict[str, Path]  # format -> written file
    deviations: list[Deviation]
    info: dict  # what load_compressed_model says about the model


# --- finding and loading the compressed model ------------------------------------------

def save_compressed_model(folder: Path, small: nn.Module, mask: Mask, arch: str, scope: str, threshold: float,
                          num_classes: int, epoch: int, **figures: float | None) -> Path:
    """Write what a search leaves for one threshold: ``mask_<scope>_<t>.json`` and the
    ``small_model_<scope>_<t>.pth.tar`` that :func:`load_compressed_model` reads (``figures``:
    accuracies stored beside the weights). Returns the small model's path."""
    save_mask(mask, folder / mask_file(scope, threshold), arch, scope, threshold)
    path = folder / small_model_file(scope, threshold)
    atomic_save({"epoch": epoch, "arch": arch, "scope": scope, "num_classes": num_classes,
                 "mask": mask_to_record(mask, arch, scope, threshold), "state_dict": small.state_dict(),
                 **figures}, path)
    return path


def compressed_model_file(path: str | os.PathLike) -> Path:
    """The checkpoint holding a compressed model: ``path`` itself if it is a file, else the
    ``small_model_*.pth.tar`` of a search folder (its own threshold's) or the best (else latest) checkpoint
    of a retrain folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_file():
        return path
    small_models = [file for file in path.iterdir() if SMALL_MODEL_PATTERN.fullmatch(file.name)]
    if small_models:
        # As the registry does: the search's own threshold (others are saved beside it).
        return searched_small_model(path, small_models)
    if (path / RUN_INFO).is_file():
        for name in (BEST, CHECKPOINT):  # model_best is missing while top-1 stayed 0
            if (path / name).is_file():
                return path / name
    raise UserError(f"{path}: neither a search folder (no small_model_*.pth.tar) nor a retrain "
                    f"folder (no run_info.json with {BEST} or {CHECKPOINT})")


def load_compressed_model(path: str | os.PathLike,
                          registry: str | os.PathLike | None = None) -> tuple[nn.Module, dict]:
    """(the compressed model in eval mode on the CPU, info) from a small-model file, a retrain
    checkpoint, or an experiment folder holding one (``compressed_model_file``).

    ``info`` holds ``path`` (the file read), ``arch``, ``scope``, ``num_classes``,
    ``epoch`` (None if unknown) and ``mask`` (the ``mask_to_record`` record).
    The model is rebuilt from the mask inside the file: no registry is needed, but for a
    retrain checkpoint of the original, which has no mask (``registry``: None, the default one).
    """
    path = original_search_small_model(path) or compressed_model_file(path)
    saved = load_checkpoint(path)
    if is_original_small_model(saved):
        return load_original_small_model(path, saved)
    if is_original_retrain_checkpoint(saved, path):
        return load_original_retrain_checkpoint(path, saved, registry)
    missing = [key for key in REQUIRED_KEYS if key not in saved]
    if missing:
        raise UserError(f"{path} is not a compressed model: it has no {', '.join(missing)} "
                        f"(a search's small_model_*.pth.tar or a retrain's checkpoint is)")
    if type(saved["num_classes"]) is not int or saved["num_classes"] < 1:
        raise UserError(f"{path}: num_classes must be a positive integer, not {saved['num_classes']!r}")
    mask = mask_from_record(saved["mask"], arch=saved["arch"], scope=saved["scope"], source=str(path))
    model = build_pruned_resnet(saved["arch"], mask, saved["scope"], saved["num_classes"])
    try:
        model.load_state_dict(saved["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as error:
        raise UserError(f"{path}: its weights do not fit the model built from its mask "
                        f"({str(error).strip().splitlines()[0]}){_older_layout_hint(saved, mask)}") from None
    info = {"path": path, "epoch": saved.get("epoch"),
            **{key: saved[key] for key in ("arch", "scope", "num_classes", "mask")}}
    return model.eval(), info


def _older_layout_hint(saved: dict, mask: dict) -> str:
    """Why an older file does not load: it kept one zero channel where a layer kept no filter,
    where a compressed model now drops that block's branch (masks.dropped_blocks)."""
    state_dict = saved["state_dict"] if isinstance(saved.get("state_dict"), dict) else {}
    emptied = [name for name, row in mask.items() if not bool(row.any()) and f"{name}.weight" in state_dict]
    if not emptied:
        return ""
    return (f"; it was saved when a layer that keeps no filter ({emptied[0]}) still had one channel, "
            f"where its block's branch is now dropped: compress the search's full model again")


# --- exporting and checking ----------------------------------------------------------

def export_bytes(model: nn.Module, export_format: str, example: torch.Tensor,
                 opset: int = ONNX_OPSET) -> bytes:
    """``model`` (put in eval mode) as a TorchScript trace or an ONNX file with a dynamic batch axis."""
    check_formats([export_format])
    model.eval()
    buffer = io.BytesIO()
    with torch.no_grad(), _quiet_exporters():
        if export_format == "torchscript":
            # check_trace would run the model twice more; check_exported compares anyway.
            torch.jit.save(torch.jit.trace(model, example, check_trace=False), buffer)
        else:
            require_onnx_packages()
            _export_onnx(model, example, buffer, opset)
    return buffer.getvalue()


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        # The legacy exporter calls its own deprecated helpers.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        yield


def _export_onnx(model: nn.Module, example: torch.Tensor, buffer: io.BytesIO, opset: int) -> None:
    batch_axis = {0: "batch"}
    options = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        options["dynamo"] = False  # the TorchScript-based exporter: no onnxscript needed
    torch.onnx.export(model, (example,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: batch_axis, OUTPUT_NAME: batch_axis},
                      opset_version=opset, **options)


def require_onnx_packages() -> None:
    """Writing ONNX needs onnx, checking it onnxruntime: say so before any work is done."""
    missing = [package for package in ("onnx", "onnxruntime") if importlib.util.find_spec(package) is None]
    if missing:
        raise UserError(f"ONNX export needs {' and '.join(missing)}: pip install {' '.join(missing)}, "
                        f"or use --format torchscript")


def run_exported(export_format: str, data: bytes, images: torch.Tensor) -> torch.Tensor:
    """The output of an exported model (``export_bytes``) on ``images``, on the CPU."""
    check_formats([export_format])
    if export_format == "torchscript":
        with _quiet_exporters():
            loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
        with torch.no_grad():
            return loaded(images.cpu())
    require_onnx_packages()
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.cpu().numpy()})
    return torch.from_numpy(logits)


def check_exported(model: nn.Module, export_format: str, data: bytes,
                   batches: Sequence[torch.Tensor]) -> list[Deviation]:
    """One Deviation per batch between the exported model and the eval-mode ``model``."""
    model.eval()
    deviations = []
    for images in batches:
        with torch.no_grad():
            reference = model(images).float().cpu()
        if not torch.isfinite(reference).all():
            raise UserError("the model itself outputs NaN or inf on random images: its weights are "
                            "broken, so there is nothing to compare the export with")
        exported = run_exported(export_format, data, images).float()
        if exported.shape != reference.shape:
            raise ExportMismatch(f"the {export_format} model returns shape {tuple(exported.shape)} "
                                 f"for a batch of {len(images)}, PyTorch {tuple(reference.shape)}")
        max_abs = (exported - reference).abs().max().item()
        scale = reference.abs().max().item()
        relative = max_abs / scale if scale > 0 else max_abs
        deviations.append(Deviation(export_format, len(images), max_abs, relative))
    return deviations


def random_batches(image_size: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Normal-noise images, ``batch_size`` of them and then ``batch_size + 1``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, image_size, image_size, generator=generator)
            for size in (batch_size, batch_size + 1)]


def output_paths(out_dir: Path, stem: str, formats: Sequence[str]) -> dict[str, Path]:
    return {export_format: out_dir / f"{stem}{FILE_SUFFIXES[export_format]}" for export_format in formats}


def check_formats(formats: Sequence[str]) -> None:
    if not formats:
        raise UserError(f"no export format given: choose from {', '.join(FORMATS)}")
    for export_format in formats:
        if export_format not in FORMATS:
            raise UserError(f"unknown export format {export_format!r}: choose from {', '.join(FORMATS)}")


def _stem(checkpoint: Path) -> str:
    name = checkpoint.name
    return name[: -len(".pth.tar")] if name.endswith(".pth.tar") else checkpoint.stem


def export_compressed_model(path: str | os.PathLike, formats: Sequence[str] = FORMATS,
                            out_dir: str | os.PathLike | None = None, image_size: int = 224,
                            batch_size: int = 1, force: bool = False, fold_bn: bool = False,
                            registry: str | os.PathLike | None = None) -> ExportResult:
    """Export the compressed model at ``path`` (see ``load_compressed_model``) in ``formats``.

    The files are ``<out_dir>/<checkpoint name>.torchscript.pt`` / ``.onnx``; ``out_dir``
    defaults to the checkpoint's folder. Raises ``ExportMismatch`` (and writes nothing)
    if an exported model deviates from PyTorch by more than ``RELATIVE_TOLERANCE``.
    ``fold_bn`` exports the model with its BatchNorms folded into the convs; ``registry``
    is where a retrain checkpoint of the original finds its baseline's mask.
    """
    check_formats(formats)
    formats = list(dict.fromkeys(formats))  # each once, in the order given
    if "onnx" in formats:
        require_onnx_packages()
    if image_size < 1 or batch_size < 1:
        raise UserError(f"--image-size and --batch-size must be positive, got {image_size} and {batch_size}")
    model, info = load_compressed_model(path, registry)
    out_dir = Path(out_dir) if out_dir is not None else info["path"].parent
    if not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: no such folder")
    targets = output_paths(out_dir, _stem(info["path"]), formats)
    if not force:
        refuse_to_replace(targets.values(), "--out another folder")  # before the slow part
    batches = random_batches(image_size, batch_size)
    to_export = fuse_bn(model) if fold_bn else model  # checked against the unfolded model below
    exported, deviations = {}, []
    for export_format in formats:
        exported[export_format] = export_bytes(to_export, export_format, batches[0])
        deviations += check_exported(model, export_format, exported[export_format], batches)
    failed = [deviation for deviation in deviations if not deviation.acceptable]
    if failed:
        raise ExportMismatch(f"the exported model deviates from PyTorch: {failed[0].describe()}, "
                             f"above the tolerance {RELATIVE_TOLERANCE:g}; nothing was written")
    if not force:
        # again: something may have appeared meanwhile
        refuse_to_replace(targets.values(), "--out another folder")
    for export_format, target in targets.items():
        atomic_write_bytes(target, exported[export_format])
    return ExportResult(files=targets, deviations=deviations, info=info)


# --- the command ----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python export.py",
        description="Write a compressed model as TorchScript and ONNX, rebuilt from the mask inside "
                    "its checkpoint, and check both against PyTorch on random images.")
    parser.add_argument("path", help="a small_model_*.pth.tar, a retrain checkpoint, or a search / "
                                     "retrain experiment folder")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), dest="formats",
                        help="formats to write (default: both)")
    parser.add_argument("--out", metavar="DIR", help="folder for the files (default: the checkpoint's)")
    parser.add_argument("--image-size", type=int, default=224, help="side of the traced images (224)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch of the traced input (1); "
                                                                 "the ONNX batch axis is dynamic")
    parser.add_argument("--fuse-bn", action="store_true", dest="fold_bn",
                        help="fold every BatchNorm into its conv first (faster to run; same outputs)")
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    parser.add_argument("--registry", metavar="FILE", default=None,
                        help="model registry naming the search behind a retrain of the original, whose "
                             "checkpoints carry no mask (default: $GSPARSITY_REGISTRY, else list_of_models.py in the working folder)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        result = export_compressed_model(args.path, args.formats, args.out, args.image_size,
                                         args.batch_size, args.force, args.fold_bn, args.registry)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except ExportMismatch as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_MISMATCH)
    info = result.info
    folded = ", BatchNorm folded into the convs" if args.fold_bn else ""
    print(f"{info['arch']} ({info['scope']}, {info['num_classes']} classes) from {info['path']}{folded}")
    print(f"checked against PyTorch on random {args.image_size}x{args.image_size} images:")
    for deviation in result.deviations:
        print(f"  {deviation.describe()}")
    for path in result.files.values():
        print(f"wrote {path}")
