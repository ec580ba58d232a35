"""gsparsity.checkpoint: atomic writes, loads that refuse code, and the RNG state round trip."""
import argparse
import collections
import errno
import os
import random

import numpy as np
import pytest
import torch

from gsparsity import checkpoint
from gsparsity.checkpoint import (atomic_save, atomic_write_bytes, atomic_write_text, capture_rng_state,
                                  load_checkpoint, load_state_dict_file, restore_rng_state)
from gsparsity.errors import UserError


class CustomDict(collections.OrderedDict):
    """A container only a full (code-running) unpickler could rebuild."""


class RunsCode:
    """Unpickling this would call os.system: the attack weights_only exists to stop."""

    def __reduce__(self):
        return os.system, ("echo unpickled",)


def write_checkpoint(path, obj) -> bytes:
    torch.save(obj, path)
    return path.read_bytes()


def files_in(folder) -> set[str]:
    return {path.name for path in folder.iterdir()}


# --- atomic writes -------------------------------------------------------------------

def test_atomic_write_text_replaces_the_file_content(tmp_path):
    target = tmp_path / "info.json"
    target.write_text("old")
    atomic_write_text(target, "new\r\nline")
    assert target.read_bytes() == b"new\r\nline"
    assert files_in(tmp_path) == {"info.json"}


def test_atomic_save_writes_a_loadable_checkpoint(tmp_path):
    target = tmp_path / "checkpoint.pth.tar"
    atomic_save({"epoch": 3, "weights": torch.arange(4.0)}, target)
    loaded = load_checkpoint(target)
    assert loaded["epoch"] == 3 and torch.equal(loaded["weights"], torch.arange(4.0))


def test_failed_rename_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pth.tar"
    atomic_save({"epoch": 1}, target)
    before = target.read_bytes()

    def refuse(source, destination):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint.os, "replace", refuse)
    with pytest.raises(UserError, match=r"could not write .*checkpoint.pth.tar: Input/output error"):
        atomic_save({"epoch": 2}, target)
    assert target.read_bytes() == before
    assert files_in(tmp_path) == {"checkpoint.pth.tar"}


def test_disk_full_during_save_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pth.tar"
    atomic_save({"epoch": 1}, target)
    before = target.read_bytes()

    def disk_full(obj, handle):
        handle.write(b"partial bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(UserError, match=os.strerror(errno.ENOSPC)):
        atomic_save({"epoch": 2}, target)
    assert target.read_bytes() == before
    assert files_in(tmp_path) == {"checkpoint.pth.tar"}


def test_writing_into_a_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="could not write"):
        atomic_write_bytes(tmp_path / "no_such_folder" / "file.bin", b"data")
    assert files_in(tmp_path) == set()


def test_rewritten_file_keeps_its_permissions(tmp_path):
    target = tmp_path / "list_of_models.py"
    target.write_text("MODELS = {}\n")
    target.chmod(0o640)
    atomic_write_text(target, "MODELS = {}  # rewritten\n")
    assert target.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("write, read, written", [
    (lambda path: atomic_write_text(path, "new"), lambda path: path.read_text(), "new"),
    (lambda path: atomic_save({"epoch": 2}, path), lambda path: load_checkpoint(path)["epoch"], 2),
], ids=["text", "checkpoint"])
def test_writing_through_a_symlink_updates_the_file_it_points_to_and_keeps_the_link(tmp_path, write, read,
                                                                                    written):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "file").write_text("old")
    link = tmp_path / "link"
    link.symlink_to("shared/file")  # relative, as `ln -s` makes it
    write(link)
    assert link.is_symlink() and os.readlink(link) == "shared/file"
    assert read(shared / "file") == written
    assert files_in(shared) == {"file"}  # the temporary file went next to the target, and is gone
    assert files_in(tmp_path) == {"shared", "link"}


# --- load_checkpoint refusals ----------------------------------------------------------

def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(UserError, match=r"absent.pth.tar: no such file"):
        load_checkpoint(tmp_path / "absent.pth.tar")


def test_truncated_checkpoint_is_reported_as_truncated_or_corrupt(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    data = write_checkpoint(path, {"state_dict": {"weight": torch.randn(64, 64)}})
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"checkpoint.pth.tar is truncated or corrupt"):
        load_checkpoint(path)


def test_empty_file_is_reported_as_truncated_or_corrupt(tmp_path):
    path = tmp_path / "empty.pth.tar"
    path.write_bytes(b"")
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_are_reported_as_truncated_or_corrupt(tmp_path, seed):
    path = tmp_path / "garbage.pth.tar"
    path.write_bytes(random.Random(seed).randbytes(300))
    with pytest.raises(UserError, match="garbage.pth.tar is truncated or corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("payload, culprit", [
    ({"state_dict": CustomDict(weight=torch.zeros(1))}, "CustomDict"),
    ({"args": argparse.Namespace(lr=0.1)}, "argparse.Namespace"),
    ({"hook": RunsCode()}, "system"),
], ids=["ordereddict_subclass", "argparse_namespace", "reduce_to_os_system"])
def test_objects_needing_arbitrary_unpickling_are_refused_for_safety(tmp_path, capfd, payload, culprit):
    path = tmp_path / "unsafe.pth.tar"
    torch.save(payload, path)
    with pytest.raises(UserError, match="refused for safety") as refusal:
        load_checkpoint(path)
    assert culprit in str(refusal.value)
    assert "only tensors and plain containers" in str(refusal.value)
    assert "unpickled" not in capfd.readouterr().out  # os.system never ran


def test_a_checkpoint_that_is_not_a_dict_is_refused(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError, match="holds a Tensor, not a checkpoint dict"):
        load_checkpoint(path)


def test_plain_containers_load(tmp_path):
    path = tmp_path / "plain.pth.tar"
    saved = {"epoch": 2, "best_acc1": 71.5, "arch": "resnet50", "history": [1, (2, 3)], "none": None,
             "ordered": collections.OrderedDict(a=torch.ones(2))}
    torch.save(saved, path)
    loaded = load_checkpoint(path)
    assert loaded["history"] == [1, (2, 3)] and loaded["none"] is None and loaded["arch"] == "resnet50"
    assert torch.equal(loaded["ordered"]["a"], torch.ones(2))


# --- load_state_dict_file ----------------------------------------------------------------

def test_plain_state_dict_file_loads_as_it_is(tmp_path):
    path = tmp_path / "resnet.pth"
    state = torch.nn.Linear(3, 2).state_dict()
    torch.save(state, path)
    loaded = load_state_dict_file(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_checkpoint_state_dict_is_taken_and_ddp_prefix_stripped(tmp_path):
    path = tmp_path / "model_best.pth.tar"
    weight = torch.randn(2, 3)
    torch.save({"epoch": 5, "state_dict": {"module.fc.weight": weight, "module.fc.bias": torch.zeros(2)}}, path)
    loaded = load_state_dict_file(path)
    assert set(loaded) == {"fc.weight", "fc.bias"}
    assert torch.equal(loaded["fc.weight"], weight)


def test_compiled_ddp_prefixes_are_stripped(tmp_path):
    path = tmp_path / "compiled.pth"
    torch.save({"module._orig_mod.conv1.weight": torch.ones(1)}, path)
    assert set(load_state_dict_file(path)) == {"conv1.weight"}


def test_a_file_without_tensors_is_refused(tmp_path):
    path = tmp_path / "info.pth"
    torch.save({"epoch": 5, "arch": "resnet50"}, path)
    with pytest.raises(UserError, match="holds no tensors"):
        load_state_dict_file(path)


def test_a_state_dict_with_a_non_tensor_entry_is_refused(tmp_path):
    path = tmp_path / "mixed.pth"
    torch.save({"state_dict": {"fc.weight": torch.ones(1), "fc.note": "hello"}}, path)
    with pytest.raises(UserError, match="'fc.note' .* is a str, not a tensor"):
        load_state_dict_file(path)


# --- RNG state -------------------------------------------------------------------------------

def draws() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
            torch.rand(3).tolist(), torch.randint(0, 1000, (2,)).tolist())


def test_rng_state_round_trips_through_a_checkpoint_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian in random's state
    np.random.randn()  # and in numpy's
    atomic_save({"rng": capture_rng_state()}, tmp_path / "checkpoint.pth.tar")
    expected = draws()
    draws()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "checkpoint.pth.tar")["rng"])
    assert draws() == expected


def test_captured_rng_state_is_plain_data_without_numpy_arrays():
    state = capture_rng_state()
    assert isinstance(state["numpy"]["keys"], list)
    assert all(isinstance(key, int) for key in state["numpy"]["keys"])
    assert isinstance(state["python"]["internal"], list)


class FakeCudaGenerators:
    """torch.cuda's generator functions for a process on GPU ``current`` of a machine with
    several; records what is read and written, and refuses reading every GPU's state."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, initialized: bool, current: int = 1) -> None:
        self.written: list[tuple[list[int], int]] = []
        self.current = current
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([current], dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "set_rng_state",
                            lambda state, device="cuda": self.written.append((state.tolist(), self.current)))

        def every_gpu() -> None:
            raise AssertionError("opens a CUDA context on every GPU")

        monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_gpu)


def test_a_gpu_process_saves_and_restores_its_own_gpus_generator_only(monkeypatch, tmp_path):
    gpus = FakeCudaGenerators(monkeypatch, initialized=True, current=1)
    atomic_save({"rng": capture_rng_state()}, tmp_path / "checkpoint.pth.tar")
    restore_rng_state(load_checkpoint(tmp_path / "checkpoint.pth.tar")["rng"])
    assert gpus.written == [([1], 1)]


def test_a_checkpoint_with_every_gpus_generator_restores_this_processs_one(monkeypatch):
    gpus = FakeCudaGenerators(monkeypatch, initialized=True, current=1)
    state = capture_rng_state()
    state["cuda"] = [torch.tensor([10], dtype=torch.uint8), torch.tensor([11], dtype=torch.uint8)]  # until 2026-11-25
    restore_rng_state(state)
    assert gpus.written == [([11], 1)]
    gpus.current = 2  # a process on a GPU the old checkpoint has no state for keeps its own
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    restore_rng_state(state)
    assert gpus.written == [([11], 1)]


def test_a_process_that_never_used_cuda_leaves_the_gpus_alone(monkeypatch):
    """A --device cpu run on a GPU machine."""
    gpus = FakeCudaGenerators(monkeypatch, initialized=False)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": pytest.fail("read a GPU's state"))
    state = capture_rng_state()
    assert "cuda" not in state
    restore_rng_state({**state, "cuda": torch.tensor([5], dtype=torch.uint8)})
    assert gpus.written == []
