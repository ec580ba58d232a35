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

from .checkpoint import atomic_write_bytes, refuse_to_replace
from .compression import load_compressed_model
from .errors import UserError
from .inference import fuse_bn

FORMATS = ("torchscript", "onnx")
FILE_SUFFIXES = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}
RELATIVE_TOLERANCE = 1e-4  # largest accepted |exported - PyTorch| / max |PyTorch|
ONNX_OPSET = 17  # run by every onnxruntime release since 1.14
INPUT_NAME, OUTPUT_NAME = "images", "logits"
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
