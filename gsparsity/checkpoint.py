"""Files that survive crashes and refuse to run code: atomic writes, safe loads, RNG state.

Writing: every file goes to a temporary file in the target's folder first, is flushed
to disk, then renamed over the target in one step (through a symlink, over the file it
points to, so the link stays a link). A crash or a full disk part-way leaves the
previous file untouched, never a half-written one. A process killed
part-way (SIGKILL) leaves its temporary file behind; :func:`remove_stale_temp_files`
clears those when the run is resumed.

Reading: checkpoints are loaded with ``weights_only=True``, so a file can hold only
tensors and plain containers (dict, list, tuple, str, numbers); anything that would
need arbitrary unpickling is refused rather than executed.
"""
from __future__ import annotations

import glob
import os
import pickle
import random
import re
import secrets
import stat
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import numpy as np
import torch

from .errors import UserError

PathLike = str | os.PathLike
CHECKPOINT = "checkpoint.pth.tar"  # an experiment folder's latest state (training.save_checkpoint)
BEST = "model_best.pth.tar"  # ... and that of its best val top-1
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DDP/DataParallel and torch.compile
TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")  # what _temp_name makes
# Messages of torch's weights-only unpickler when a file asks for something beyond
# tensors and plain containers (as opposed to bytes that are not a pickle at all).
SAFETY_REFUSALS = ("GLOBAL ", "Trying to call reduce", "Can only create new object",
                   "Can only build", "Trying to instantiate")


# --- atomic writes -------------------------------------------------------------------

def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step (see the module docstring)."""
    _atomic_write(Path(path), lambda handle: handle.write(data))


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text``, byte for byte (no newline translation)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    _atomic_write(Path(path), lambda handle: torch.save(obj, handle))


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    # Through a symlink, replace the file it points to (renaming over the link would turn it into
    # a plain file and leave the shared target stale); the temp file sits next to that real file,
    # so os.replace stays on one file system and atomic.
    target = Path(os.path.realpath(path))
    temp = target.with_name(_temp_name(target))
    try:
        # os.open with mode 0o666 lets the umask decide the permissions, as open() would.
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        _keep_permissions(target, temp)
        os.replace(temp, target)
    except Exception as error:  # disk full, no permission, unpicklable object...
        _remove_quietly(temp)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        kept = "the previous version is intact" if target.exists() else "nothing was written"
        raise UserError(f"could not write {path}: {reason}; {kept}") from error
    except BaseException:  # e.g. Ctrl-C: still leave no temporary file behind
        _remove_quietly(temp)
        raise
    _fsync_directory(target.parent)


def refuse_to_replace(paths: Iterable[Path], instead: str) -> None:
    """Stop if any of ``paths`` exists: the commands that write results (export.py, report.py)
    replace a file only with --force. ``instead`` names the other way out, e.g. "--out another file"."""
    existing = [path for path in paths if path.exists()]
    if existing:
        raise UserError(f"{existing[0]} already exists; use --force to replace it, or {instead}")


def _temp_name(path: Path) -> str:
    return f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def remove_stale_temp_files(folder: PathLike) -> list[Path]:
    """Remove the temporary files that killed writers left in ``folder``, and next to the
    files its symlinks point to (where writes through them go); the ones whose process
    still runs on this machine are kept. Returns the removed paths."""
    removed = []
    for candidate in _temp_file_candidates(Path(folder)):
        found = TEMP_NAME.match(candidate.name)
        if found and not _process_alive(int(found.group(1))):
            _remove_quietly(candidate)
            removed.append(candidate)
    return removed


def _temp_file_candidates(folder: Path) -> list[Path]:
    candidates = sorted(folder.glob(".*.tmp"))
    for link in sorted(path for path in folder.iterdir() if path.is_symlink()):
        target = Path(os.path.realpath(link))  # only its own temporaries: the folder is not ours
        candidates += sorted(target.parent.glob(f".{glob.escape(target.name)}.*.tmp"))
    return candidates


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _keep_permissions(target: Path, temp: Path) -> None:
    """A rewritten file keeps the mode it had (e.g. a hand-made read-for-all registry)."""
    if target.exists():
        os.chmod(temp, stat.S_IMODE(target.stat().st_mode))


def _fsync_directory(folder: Path) -> None:
    """Make the rename itself durable across a power cut."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a folder
        return
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems cannot sync a folder; the file itself is already in place
    finally:
        os.close(descriptor)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass  # never created, or not removable: nothing more we can do, keep the first error


# --- safe loads ----------------------------------------------------------------------

def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict:
    """A checkpoint written by ``torch.save``, loaded without running any code from it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise _unpickling_problem(path, str(error)) from None
    except PermissionError:
        raise UserError(f"could not read {path}: permission denied") from None
    except Exception as error:  # damaged bytes surface as RuntimeError, OSError, EOFError, KeyError...
        raise UserError(f"{path} is truncated or corrupt ({_first_line(error)}); "
                        f"it is not a complete file written by torch.save") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path} holds a {type(loaded).__name__}, not a checkpoint dict")
    return loaded


def _unpickling_problem(path: Path, message: str) -> UserError:
    if any(marker in message for marker in SAFETY_REFUSALS):
        found = re.search(r"GLOBAL (\S+)", message)
        culprit = f" (it asks for {found.group(1)})" if found else ""
        return UserError(f"{path} was refused for safety{culprit}: only tensors and plain "
                         f"containers (dict, list, tuple, str, numbers) are accepted, because "
                         f"loading anything else could run arbitrary code")
    return UserError(f"{path} is truncated or corrupt: it is not a complete file written by torch.save")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_state_dict_file(path: PathLike) -> dict[str, torch.Tensor]:
    """Model weights from a plain state_dict file or from one of our checkpoints.

    Accepts e.g. torchvision's ``resnet50-0676ba61.pth`` or a checkpoint with a
    ``"state_dict"`` key; drops the ``module.`` prefix that DDP adds to every name.
    """
    loaded = load_checkpoint(path)
    state = loaded["state_dict"] if isinstance(loaded.get("state_dict"), dict) else loaded
    if not any(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserError(f"{path} holds no tensors: expected a state_dict or a checkpoint "
                        f"with a 'state_dict' key")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: entry {key!r} of its state_dict is a "
                            f"{type(value).__name__}, not a tensor")
    return {_strip_wrapper_prefixes(str(key)): value for key, value in state.items()}


def _strip_wrapper_prefixes(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


# --- random number generators ---------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """Every generator's state, as data that ``load_checkpoint`` accepts."""
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        # numpy's state holds an ndarray, which weights_only loading refuses: store lists.
        "numpy": {"name": name, "keys": keys.tolist(), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_initialized():
        # This process's GPU only: reading every GPU's state would open a CUDA context on
        # each of them, and a CPU run on a GPU machine would open one at all.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` captured, so the next draws repeat."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], np.array(numpy["keys"], dtype=np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_initialized():
        if isinstance(cuda, (list, tuple)):  # checkpoints until 2026-11-25 held every GPU's state
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda.cpu())
