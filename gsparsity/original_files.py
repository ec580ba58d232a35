"""The original's folders (cc-hpc-itwm/GSparsity, ``filter_pruning/``), read without running code from them.

What the original leaves behind (ResNet-50 only; its threshold written with ``str``, so
``1e-06``):

* a search (``main_search_conv12.py`` / ``main_search_all_conv.py``), after every epoch,
  in its folder:

  - ``mask_<threshold>.npy``, the same name for both scopes: ``np.save`` of a nested
    Python list ``mask[layer][block][conv]``, 4 layers of 3, 4, 6 and 3 Bottlenecks,
    3 entries per block (conv1, conv2, conv3 in that order, whatever the scope), each
    entry a numpy bool array with one flag per filter, True where the filter's L2 norm is
    above the threshold. The list is ragged, so numpy (1.19) stored it as a 1-D object
    array of the 4 layer lists, that is as a pickle.
  - ``small_model_<scope>_<threshold>.pth.tar`` (scope ``conv12`` or ``all_conv``: the
    file name is what tells the scopes apart): ``torch.save({'small_model': state_dict})``
    of its reduced ResNet-50. The keys are torchvision's, as ours are; a block whose
    branch has a conv keeping no filter has only its ``downsample`` (its forward is
    ``relu(shortcut)``), and no block has our ``residual_bias`` buffer, which is zero
    where the original adds nothing (its all_conv block adds the narrow branch into the
    full-width residual at the kept channels, as ours does).

* a retrain (``main_reduce_retrain_*.py --baseline_model NAME``): ``checkpoint.pth.tar``
  and ``model_best.pth.tar`` = ``{'epoch', 'arch', 'state_dict', 'best_acc1',
  'optimizer'}``, with the ``module.`` names of DistributedDataParallel, and
  ``run_info.json`` = ``{'args': {..., 'baseline_model', 'pruning_threshold'}}``. No mask:
  it is the baseline's, found through the registry as the original did.

The mask's pickle is read by :func:`read_original_mask`, which builds what it holds
itself: its unpickler resolves exactly three names (numpy's ``_reconstruct``,
``ndarray`` and ``dtype``, all an ndarray's pickle needs) to stand-ins of its own that
accept only 1-D arrays of bools or integers, and refuses every other name, so nothing
from the file is ever imported or called.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import WRAPPER_PREFIXES
from .errors import UserError
from .masks import Mask, check_mask, mask_to_record, reference_model
from .pruned_resnet import build_pruned_resnet
from .registry import (ORIGINAL_ARCH, SCOPED_SMALL_MODEL, default_small_model, registry_file, resolve,
                       saved_small_models)
from .structure import prunable_convs

RUN_INFO = "run_info.json"
DEFAULT_THRESHOLD = 1e-6  # the original's --pruning_threshold
MAX_MASK_BYTES = 16 * 2**20  # ResNet-50's mask is about 30 KB
MAX_ITEMS = 2_000_000  # values visited while reading a mask (shared sublists count each time)
MAX_DEPTH = 4  # object array -> layers -> blocks -> convs -> flags
NUMBER_KINDS = "biu"  # bool, signed and unsigned integers
SAFETY = ("only numpy arrays and lists of 0/1 flags are read from it, because unpickling "
          "anything else could run code")


# --- reading the mask file -------------------------------------------------------------

class _Refused(pickle.UnpicklingError):
    """The pickle asks for something beyond an ndarray of bools or integers."""


_NDARRAY = object()  # stands for numpy.ndarray: only the _reconstruct stand-in accepts it
DTYPES = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "O4", "O8"}  # as a pickled dtype names them


class _Dtype:
    """Stand-in for a pickled ``numpy.dtype`` of bools, integers or objects."""

    def __init__(self, descr: str) -> None:
        self.dtype, self.built = np.dtype(descr), False

    def __setstate__(self, state: object) -> None:
        # (version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata])
        if (self.built or not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4)
                or state[1] not in ("<", ">", "|", "=") or any(item is not None for item in state[2:5])
                or (len(state) == 9 and state[8] is not None)):
            raise _Refused("it holds a dtype that is not a plain number or object type")
        if state[1] in ("<", ">") and self.dtype.kind in NUMBER_KINDS:
            self.dtype = self.dtype.newbyteorder(state[1])
        self.built = True


class _Array:
    """Stand-in for a pickled ndarray: its items as a list, once ``__setstate__`` has run."""

    def __init__(self) -> None:
        self.items: list | None = None

    def __setstate__(self, state: object) -> None:
        # (version, shape, dtype, Fortran order, data: the raw bytes, or a list of objects)
        if self.items is not None or not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise _Refused("it holds an array in an unknown layout")
        _, shape, dtype, _, data = state
        if not (isinstance(shape, tuple) and len(shape) == 1 and type(shape[0]) is int
                and 0 <= shape[0] <= MAX_ITEMS):
            raise _Refused("it holds an array that is not 1-D or is far too long")
        if not isinstance(dtype, _Dtype) or not dtype.built:
            raise _Refused("it holds an array without a dtype")
        (length,) = shape
        if dtype.dtype.kind == "O":
            if type(data) is not list or len(data) != length:
                raise _Refused("it holds an object array whose items do not match its shape")
            self.items = data
        else:
            if type(data) is not bytes or len(data) != length * dtype.dtype.itemsize:
                raise _Refused("it holds an array whose bytes do not match its shape")
            self.items = np.frombuffer(data, dtype=dtype.dtype).tolist()


class _MaskUnpickler(pickle.Unpickler):
    """Resolves numpy's three array names to stand-ins and refuses every other name.

    The stand-ins are bound methods, fresh for every file, so that nothing a pickle does
    to them (its BUILD opcode sets attributes) outlives the reading of that file.
    """

    def find_class(self, module: str, name: str) -> object:
        constructors = {
            ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,  # numpy 1.x, as the original wrote it
            ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,  # numpy 2.x
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): self._dtype,
        }
        constructor = constructors.get((module, name))
        if constructor is None:
            raise _Refused(f"it asks for {module}.{name}")
        return constructor

    def persistent_load(self, pid: object) -> object:
        raise _Refused("it asks for a persistent object")

    def _reconstruct(self, subtype: object, shape: object, typecode: object) -> _Array:
        if subtype is not _NDARRAY or shape != (0,) or typecode != b"b":
            raise _Refused("it reconstructs something other than a plain ndarray")
        return _Array()

    def _dtype(self, descr: object, align: object = False, copy: object = True) -> _Dtype:
        if not isinstance(descr, str) or descr not in DTYPES or align not in (0, 1) or copy not in (0, 1):
            raise _Refused(f"it holds an array of {descr!r}, not of bools or integers")
        return _Dtype(descr)


def read_original_mask(path: str | os.PathLike) -> list:
    """The original's ``mask_<threshold>.npy`` as nested lists of ints, nothing run from it.

    Object arrays are unpickled by :class:`_MaskUnpickler`; other arrays must hold bools
    or integers. Whatever comes out must be lists (or tuples) of such arrays, lists and
    ints, at most ``MAX_DEPTH`` deep.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size > MAX_MASK_BYTES:
        raise UserError(f"{path} is {path.stat().st_size} bytes, too large for a mask of the original")
    with path.open("rb") as file:
        try:
            version = np.lib.format.read_magic(file)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f".npy format version {version[0]}.{version[1]}")
            shape, fortran_order, dtype = read_header(file)
        except (ValueError, EOFError, SyntaxError) as error:
            raise UserError(f"{path} is not a readable .npy file ({_first_line(error)})") from None
        data = file.read()
    if dtype == np.dtype(object):
        if len(shape) != 1:
            raise UserError(f"{path}: an object array of shape {shape}, where the original saves a 1-D one")
        loaded = _unpickle(data, path)
        if not isinstance(loaded, _Array) or loaded.items is None or len(loaded.items) != shape[0]:
            raise UserError(f"{path}: its pickle does not hold the array its header announces")
    elif dtype.kind in NUMBER_KINDS and not dtype.hasobject:
        count = math.prod(shape)
        if count > MAX_ITEMS:
            raise UserError(f"{path} holds {count} values, far more than a mask of the original")
        if len(data) != count * dtype.itemsize:
            raise UserError(f"{path} is truncated or corrupt: {len(data)} bytes of data for shape {shape}")
        loaded = np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order="F" if fortran_order else "C")
        loaded = loaded.tolist()
    else:
        raise UserError(f"{path} holds an array of {dtype}, not the original's mask of 0/1 flags")
    return _plain(loaded, path, [0])


def _unpickle(data: bytes, path: Path) -> object:
    try:
        return _MaskUnpickler(io.BytesIO(data)).load()
    except _Refused as error:
        raise UserError(f"{path} was refused for safety ({error}): {SAFETY}") from None
    except Exception as error:  # truncated or garbled bytes: EOFError, UnpicklingError, TypeError...
        raise UserError(f"{path} is truncated or corrupt ({_first_line(error)}); "
                        f"it is not a mask saved by the original") from None


def _plain(value: object, path: Path, visited: list[int], depth: int = 0) -> object:
    """``value`` with every stand-in array replaced by its items; only lists and ints allowed."""
    visited[0] += 1
    if visited[0] > MAX_ITEMS:
        raise UserError(f"{path} holds more than {MAX_ITEMS} values, far more than a mask of the original")
    if isinstance(value, _Array):
        if value.items is None:
            raise UserError(f"{path} is truncated or corrupt: an array in it has no data")
        value = value.items
    if type(value) in (list, tuple):
        if depth >= MAX_DEPTH:
            raise UserError(f"{path} nests lists deeper than the original's mask[layer][block][conv][filter]")
        return [_plain(item, path, visited, depth + 1) for item in value]
    if type(value) in (int, bool):
        return int(value)
    raise UserError(f"{path} holds a {type(value).__name__}, where the original's mask has only 0/1 flags")


# --- the mask it describes ---------------------------------------------------------------

def mask_from_original(nested: object, scope: str, arch: str = ORIGINAL_ARCH, source: str = "the mask") -> Mask:
    """Our mask from the original's ``mask[layer][block][conv]`` of 0/1 flags per filter.

    Every block lists its branch's convs in order (conv1, conv2, conv3); the flags of the
    convs ``scope`` prunes become ``layer<l+1>.<b>.conv<c+1>`` rows (conv12 leaves conv3's
    aside, as the original's conv12 model does). The whole structure is checked against
    ``arch``: layers, blocks, convs and one flag per filter.
    """
    layers: dict[str, dict[str, list]] = {}  # stage -> block -> [(conv name, filters)]
    for prunable in prunable_convs(reference_model(arch), "all_conv"):
        layers.setdefault(prunable.stage, {}).setdefault(prunable.block_name, []).append(
            (prunable.name, prunable.conv.out_channels))
    rows: dict[str, torch.Tensor] = {}
    _expect_list(nested, len(layers), f"{source}: the mask", "layers", arch)
    for stage_entry, (stage, blocks) in zip(nested, layers.items()):
        _expect_list(stage_entry, len(blocks), f"{source}: {stage}", "blocks", arch)
        for block_entry, (block, convs) in zip(stage_entry, blocks.items()):
            _expect_list(block_entry, len(convs), f"{source}: block {block}", "convs", arch)
            for flags, (conv, filters) in zip(block_entry, convs):
                if not isinstance(flags, list) or len(flags) != filters or any(flag not in (0, 1) for flag in flags):
                    count = len(flags) if isinstance(flags, list) else "no"
                    raise UserError(f"{source}: the entry of {conv} must flag each of its {filters} filters "
                                    f"with 0 or 1, as the original's masks do; it has {count} values")
                rows[conv] = torch.tensor(flags, dtype=torch.bool)
    mask = {prunable.name: rows[prunable.name] for prunable in prunable_convs(reference_model(arch), scope)}
    check_mask(mask, arch, scope)
    return mask


def _expect_list(value: object, length: int, what: str, parts: str, arch: str) -> None:
    if not isinstance(value, list) or len(value) != length:
        found = f"{len(value)}" if isinstance(value, list) else "no list of"
        raise UserError(f"{what} has {found} {parts}, {arch} has {length}")


# --- the models ------------------------------------------------------------------------------

def original_search_small_model(path: str | os.PathLike) -> Path | None:
    """For a search folder of the original (one holding a ``mask_<threshold>.npy``), its
    compressed model of 1e-06, as the registry takes it (``default_small_model``); else None."""
    path = Path(path)
    if not path.is_dir() or not any(path.glob("mask_*.npy")):
        return None
    small_models = [file for file in saved_small_models(path) if SCOPED_SMALL_MODEL.fullmatch(file.name)]
    return default_small_model(small_models) if small_models else None


def is_original_small_model(saved: dict) -> bool:
    """A search's ``{'small_model': state_dict}`` of the original (ours carry a mask)."""
    return "small_model" in saved and "mask" not in saved and "state_dict" not in saved


def is_original_retrain_checkpoint(saved: dict, path: Path) -> bool:
    """A retrain checkpoint of the original: weights without a mask, beside a run_info.json
    that names the retrain's --baseline_model."""
    return ("state_dict" in saved and "mask" not in saved and "scope" not in saved
            and isinstance(_original_args(path.parent).get("baseline_model"), str))


def load_original_small_model(path: Path, saved: dict) -> tuple[nn.Module, dict]:
    """(model, info) from the original's ``small_model_<scope>_<threshold>.pth.tar`` and the
    ``mask_<threshold>.npy`` beside it; ``info`` as ``compression.load_compressed_model`` gives it."""
    match = SCOPED_SMALL_MODEL.fullmatch(path.name)
    if match is None:
        raise UserError(f"{path} is a compressed model of the original, whose scope and mask only its "
                        f"name tells (small_model_<conv12|all_conv>_<threshold>.pth.tar): rename it so")
    scope, threshold = match["scope"], _threshold(match["threshold"], path)
    mask_path = path.parent / f"mask_{match['threshold']}.npy"
    if not mask_path.is_file():
        raise UserError(f"{path}: its mask {mask_path.name}, which the original saves beside it, "
                        f"is not in {path.parent}")
    return _load(path, saved["small_model"], mask_path, scope, threshold, epoch=None)


def load_original_retrain_checkpoint(path: Path, saved: dict,
                                     registry: str | os.PathLike | None = None) -> tuple[nn.Module, dict]:
    """(model, info) from a retrain checkpoint of the original: the mask is the one its
    --baseline_model's search saved, looked up in ``registry`` (``--registry``)."""
    args = _original_args(path.parent)
    name = args["baseline_model"]
    try:
        baseline = resolve(name, registry_file(None if registry is None else str(registry)))
    except UserError as error:
        raise UserError(f"{path}: the original's retrain of {name!r} carries no mask, and its "
                        f"baseline cannot be found ({error}); give the registry that names it") from None
    threshold = _threshold(args.get("pruning_threshold", DEFAULT_THRESHOLD), path)
    mask_path = baseline.experiment_dir / f"mask_{threshold}.npy"  # str(), as the original names it
    if not mask_path.is_file():
        raise UserError(f"{path}: its baseline {name!r} has no {mask_path.name} in {baseline.experiment_dir}")
    arch = saved.get("arch", ORIGINAL_ARCH)
    if arch != ORIGINAL_ARCH:
        raise UserError(f"{path}: a retrain of the original's {arch!r}; the original compresses {ORIGINAL_ARCH} only")
    epoch = saved.get("epoch")
    return _load(path, saved["state_dict"], mask_path, baseline.scope, threshold,
                 epoch=epoch if type(epoch) is int else None)


def _original_args(folder: Path) -> dict:
    try:
        info = json.loads((folder / RUN_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    args = info.get("args") if isinstance(info, dict) else None
    return args if isinstance(args, dict) else {}


def _threshold(text: object, path: Path) -> float:
    try:
        threshold = float(text)
    except (TypeError, ValueError):
        threshold = math.nan
    if not threshold > 0 or math.isinf(threshold):
        raise UserError(f"{path}: pruning threshold {text!r} is not a positive number")
    return threshold


def _load(path: Path, state_dict: object, mask_path: Path, scope: str, threshold: float,
          epoch: int | None) -> tuple[nn.Module, dict]:
    weights = _state_dict(state_dict, path)
    classifier = weights.get("fc.weight")
    if classifier is None or classifier.dim() != 2:
        raise UserError(f"{path}: its weights have no classifier fc.weight, so they are not a ResNet's")
    num_classes = classifier.shape[0]
    mask = mask_from_original(read_original_mask(mask_path), scope, ORIGINAL_ARCH, str(mask_path))
    model = build_pruned_resnet(ORIGINAL_ARCH, mask, scope, num_classes)
    load_original_weights(model, weights, f"{path} ({ORIGINAL_ARCH}, {scope}, as {mask_path.name} prunes it)")
    info = {"path": path, "epoch": epoch, "arch": ORIGINAL_ARCH, "scope": scope, "num_classes": num_classes,
            "mask": mask_to_record(mask, ORIGINAL_ARCH, scope, threshold)}
    return model.eval(), info


def _state_dict(state_dict: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, dict) or not all(isinstance(key, str) and isinstance(value, torch.Tensor)
                                                   for key, value in state_dict.items()):
        raise UserError(f"{path}: its weights are not a state_dict of named tensors")
    return {_strip_wrappers(key): value for key, value in state_dict.items()}


def _strip_wrappers(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def load_original_weights(model: nn.Module, weights: dict[str, torch.Tensor], described: str) -> None:
    """Load the original's compressed state_dict into our compressed ``model``.

    Its keys are ours but for ``residual_bias``, which the original's blocks lack and which
    is zero where they add nothing; BatchNorm counters missing from very old files start at
    zero, as torch's own loading lets them. Anything else missing, extra or of another
    shape is refused, naming the first such key.
    """
    expected = model.state_dict()
    weights = dict(weights)
    for key, value in expected.items():
        if key not in weights and key.endswith(("residual_bias", "num_batches_tracked")):
            weights[key] = torch.zeros_like(value)
    missing = [key for key in expected if key not in weights]
    extra = [key for key in weights if key not in expected]
    wrong = [key for key in expected if key in weights and weights[key].shape != expected[key].shape]
    if missing or extra or wrong:
        if missing:
            problem = f"it has no {missing[0]}"
        elif extra:
            problem = f"it has {extra[0]}, which that model has not"
        else:
            problem = (f"its {wrong[0]} has shape {tuple(weights[wrong[0]].shape)}, "
                       f"that model's {tuple(expected[wrong[0]].shape)}")
        others = len(missing) + len(extra) + len(wrong) - 1
        raise UserError(f"{described}: its weights do not fit: {problem}"
                        f"{f' (and {others} more)' if others else ''}")
    model.load_state_dict(weights)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
