"""The original's folders (cc-hpc-itwm/GSparsity, filter_pruning/): its registry lines, its search
folders and its retrain checkpoints are retrained, evaluated and exported; its pickled mask is
read without running anything from it.

The folders are written here in the original's formats, as its scripts write them:
``main_search_*.py``'s compute_save_mask saves ``mask[layer][block][conv]`` (numpy bool arrays,
one flag per filter) with ``np.save`` as numpy 1.19 did (a ragged list: a pickled 1-D object
array, protocol 3, ``numpy.core.multiarray``), and ``torch.save({'small_model': state_dict})``
of its reduced ResNet-50, in torch 1.4's (pre-zip) format, as ``small_model_<scope>_1e-06.pth.tar``;
its retrain saves ``{'epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer'}`` with
DistributedDataParallel's ``module.`` names. The reduced state_dict is made here the way the
original's transfer_model_parameters makes it, from a full ResNet-50 whose pruned filters output
exactly zero, so that the model read back must compute what the full model computes.
"""
import io
import json
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from numerics import relative_deviation
from scripts import TINY, run_script, scratch_folder

from gsparsity import launch
from gsparsity.distill import searchs_starting_weights
from gsparsity.errors import UserError
from gsparsity.compression import load_compressed_model
from gsparsity.export import main as export_main
from gsparsity.original_files import mask_from_original, read_original_mask
from gsparsity.registry import RegisteredModel, read_registry, register, resolve, unregister
from gsparsity.retrain import small_model_path

CLASSES, IMAGE_SIZE = 10, 32  # the demo digits' classes
BLOCKS, PLANES = (3, 4, 6, 3), (64, 128, 256, 512)  # ResNet-50, the original's only architecture
PRUNED_CONVS = {"conv12": (0, 1), "all_conv": (0, 1, 2)}  # which of a block's convs each scope prunes
EMPTIED = {"conv12": (0, 1, 0), "all_conv": (2, 0, 2)}  # (layer, block, conv) keeping no filter
NAME = "pretrained_conv12_layer_adaptive_mu_0_05"
FOLDER = {scope: f"{scope}_lr_0.001_momentum_0.9_wd_0.05_normalization_div_pretrained_True_20211102-092334"
          for scope in PRUNED_CONVS}
MASK_FILE = "mask_1e-06.npy"  # str(1e-6), for both scopes
NUMPY_1 = b"cnumpy.core.multiarray\n_reconstruct\n"  # how numpy 1.19 named ndarray's pickle constructor


# --- the original's files --------------------------------------------------------------------------

def original_mask(seed: int, emptied: tuple[int, int, int]) -> list:
    """mask[layer][block][conv] as compute_save_mask builds it: per conv of every Bottleneck
    (conv1, conv2, conv3), a numpy bool array, True for a filter kept; one conv keeps none."""
    generator = torch.Generator().manual_seed(seed)
    mask = [[[(torch.rand(width, generator=generator) < 0.6).numpy() for width in (planes, planes, 4 * planes)]
             for _ in range(blocks)] for blocks, planes in zip(BLOCKS, PLANES)]
    layer, block, conv = emptied
    mask[layer][block][conv][:] = False
    return mask


def object_array(mask: list) -> np.ndarray:
    """What numpy 1.19's np.save(file, mask) made of the ragged list: a 1-D array of its 4 layer lists."""
    array = np.empty(len(mask), dtype=object)
    for index, layer in enumerate(mask):
        array[index] = layer
    return array


def npy_as_numpy_1_19_wrote_it(array: np.ndarray) -> bytes:
    """np.save's bytes under numpy 1.19: a format 1.0 header, then the array pickled with protocol 3,
    its constructor named numpy.core.multiarray._reconstruct (today's numpy says numpy._core)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    pickled = pickle.dumps(array, protocol=3)
    today = b"cnumpy._core.multiarray\n_reconstruct\n"
    assert pickled.count(today) == 1
    return header.getvalue() + pickled.replace(today, NUMPY_1)


def dropped(mask: list, scope: str, layer: int, block: int) -> bool:
    """The original's reduced block keeps its branch only if every conv it prunes keeps a filter."""
    return not all(mask[layer][block][conv].any() for conv in PRUNED_CONVS[scope])


def full_model_with_zero_pruned_filters(mask: list, scope: str, seed: int) -> torch.nn.Module:
    """A random ResNet-50 in which every pruned filter, and every dropped branch, outputs exactly 0,
    so that the reduced model computes what it computes."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet50(num_classes=CLASSES).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
        for layer, blocks in enumerate(BLOCKS):
            for block in range(blocks):
                module = model.get_submodule(f"layer{layer + 1}.{block}")
                module.bn3.bias.normal_(0, 0.1)
                for conv in PRUNED_CONVS[scope]:
                    pruned = ~torch.from_numpy(mask[layer][block][conv])
                    getattr(module, f"conv{conv + 1}").weight[pruned] = 0
                    bn = getattr(module, f"bn{conv + 1}")
                    bn.weight[pruned], bn.bias[pruned] = 0, 0
                if dropped(mask, scope, layer, block):
                    module.bn3.weight.zero_(), module.bn3.bias.zero_()
    return model


def reduced_state_dict(full: dict, mask: list, scope: str) -> dict:
    """The state_dict of the original's reduced model, as its transfer_model_parameters fills it:
    a pruned conv keeps the rows (and its BN the entries) of its kept filters, the next conv the
    matching columns; a dropped block keeps only its downsample."""
    reduced = {}
    for key, value in full.items():
        parts = key.split(".")
        if parts[0].startswith("layer"):
            layer, block, module = int(parts[0][5]) - 1, int(parts[1]), parts[2]
            flags = mask[layer][block]
            if dropped(mask, scope, layer, block) and module != "downsample":
                continue
            if module[:-1] in ("conv", "bn") and parts[-1] != "num_batches_tracked":
                conv = int(module[-1]) - 1
                if conv in PRUNED_CONVS[scope]:
                    value = value[torch.from_numpy(flags[conv])]
                if module.startswith("conv") and conv - 1 in PRUNED_CONVS[scope]:
                    value = value[:, torch.from_numpy(flags[conv - 1])]
        reduced[key] = value.clone()
    return reduced


def torch_1_4_save(obj: object, path: Path) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)  # torch 1.4 knew no other format


def write_search_folder(folder: Path, scope: str, seed: int = 0) -> torch.nn.Module:
    """A search folder of the original: mask, compressed model, run_info.json; the full model."""
    folder.mkdir(parents=True)
    mask = original_mask(seed, EMPTIED[scope])
    full = full_model_with_zero_pruned_filters(mask, scope, seed)
    (folder / MASK_FILE).write_bytes(npy_as_numpy_1_19_wrote_it(object_array(mask)))
    torch_1_4_save({"small_model": reduced_state_dict(full.state_dict(), mask, scope)},
                   folder / f"small_model_{scope}_1e-06.pth.tar")
    (folder / "run_info.json").write_text(json.dumps({"args": {
        "arch": "resnet50", "lr": 0.001, "weight_decay": 0.05, "pretrained": True, "normalization": "div",
        "path_to_save": folder.name}}))
    return full


def write_retrain_folder(folder: Path, search: Path, name: str) -> None:
    """A retrain folder of the original, one epoch into retraining the search's compressed model."""
    folder.mkdir(parents=True)
    small = torch.load(search / "small_model_conv12_1e-06.pth.tar", weights_only=True)["small_model"]
    optimizer_state = {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "dampening": 0,
                                                      "weight_decay": 1e-4, "nesterov": False, "params": [0]}]}
    checkpoint = {"epoch": 1, "arch": "resnet50", "best_acc1": torch.tensor(12.5), "optimizer": optimizer_state,
                  "state_dict": {f"module.{key}": value for key, value in small.items()}}
    torch_1_4_save(checkpoint, folder / "checkpoint.pth.tar")
    shutil.copyfile(folder / "checkpoint.pth.tar", folder / "model_best.pth.tar")
    (folder / "run_info.json").write_text(json.dumps({"args": {
        "baseline_model": name, "arch": "resnet50", "pruning_threshold": 1e-06, "lr": 0.1,
        "path_to_save": folder.name}}))


def originals_registry(folder: Path, lines: dict[str, str]) -> Path:
    """The original's list_of_models.py: one line name = 'folder' per model, a blank line between."""
    registry = folder / "list_of_models.py"
    registry.write_text("".join(f"{name} = '{target}'\n\n" for name, target in lines.items()))
    return registry


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Iterator[dict]:
    """{scope: (search folder, its full model)} under one root holding the original's registry."""
    with scratch_folder(tmp_path_factory, "originals") as root:
        made = {scope: (root / FOLDER[scope], write_search_folder(root / FOLDER[scope], scope))
                for scope in PRUNED_CONVS}
        originals_registry(root, {NAME: FOLDER["conv12"], "pretrained_all_conv_mu_0_09": FOLDER["all_conv"]})
        yield made


@pytest.fixture
def copied(originals, tmp_path) -> Path:
    """A writable copy of the originals' root (its registry and folders)."""
    root = tmp_path / "root"
    shutil.copytree(next(iter(originals.values()))[0].parent, root)
    return root


# --- the mask file -------------------------------------------------------------------------------

@pytest.mark.parametrize("written_by", ["numpy 1.19", "numpy today"])
def test_the_originals_pickled_mask_reads_as_its_flags(tmp_path, written_by):
    mask = original_mask(1, EMPTIED["conv12"])
    path = tmp_path / MASK_FILE
    if written_by == "numpy 1.19":
        path.write_bytes(npy_as_numpy_1_19_wrote_it(object_array(mask)))
        assert NUMPY_1 in path.read_bytes()
    else:
        np.save(path, object_array(mask), allow_pickle=True)
    flags = [[[row.astype(int).tolist() for row in block] for block in layer] for layer in mask]
    assert read_original_mask(path) == flags


@pytest.mark.parametrize("scope", PRUNED_CONVS)
def test_mask_entries_become_our_conv_names_in_forward_order(scope):
    mask = original_mask(2, EMPTIED[scope])
    nested = [[[row.astype(int).tolist() for row in block] for block in layer] for layer in mask]
    ours = mask_from_original(nested, scope)
    expected = {f"layer{layer + 1}.{block}.conv{conv + 1}": torch.from_numpy(mask[layer][block][conv])
                for layer, blocks in enumerate(BLOCKS) for block in range(blocks) for conv in PRUNED_CONVS[scope]}
    assert list(ours) == list(expected)  # conv12: conv3's flags, which its model ignores, are left out
    assert all(torch.equal(ours[name], expected[name]) for name in expected)


# --- the compressed model ---------------------------------------------------------------------------

@pytest.mark.parametrize("scope", PRUNED_CONVS)
@pytest.mark.slow
def test_the_originals_compressed_model_computes_what_its_full_model_computes(originals, scope):
    folder, full = originals[scope]
    model, info = load_compressed_model(folder)
    assert info["path"] == folder / f"small_model_{scope}_1e-06.pth.tar"
    assert (info["arch"], info["scope"], info["num_classes"], info["epoch"]) == ("resnet50", scope, CLASSES, None)
    assert info["mask"]["threshold"] == 1e-6
    torch.manual_seed(3)
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert relative_deviation(full(images), model(images)) < 1e-5
    assert sum(parameter.numel() for parameter in model.parameters()) < 0.8 * sum(
        parameter.numel() for parameter in full.parameters())


def test_the_registry_resolves_the_originals_line_from_the_folders_files(originals):
    folder = originals["conv12"][0]
    assert resolve(NAME, folder.parent / "list_of_models.py") == RegisteredModel(
        name=NAME, experiment_dir=folder, small_model=folder / "small_model_conv12_1e-06.pth.tar",
        mask=folder / MASK_FILE, scope="conv12", arch="resnet50")
    assert resolve("pretrained_all_conv_mu_0_09", folder.parent / "list_of_models.py").scope == "all_conv"


@pytest.mark.slow
def test_of_the_thresholds_a_finished_search_saved_1e_06_is_taken_as_the_originals_retrain_took_it(copied):
    folder = copied / FOLDER["conv12"]
    for threshold in ("1e-05", "0.0001", "0.001", "0.01", "0.1"):  # its last loop saves these after 1e-06
        shutil.copyfile(folder / MASK_FILE, folder / f"mask_{threshold}.npy")
        shutil.copyfile(folder / "small_model_conv12_1e-06.pth.tar", folder / f"small_model_conv12_{threshold}.pth.tar")
    registry = copied / "list_of_models.py"
    assert resolve(NAME, registry).small_model == folder / "small_model_conv12_1e-06.pth.tar"
    assert load_compressed_model(folder)[1]["path"] == folder / "small_model_conv12_1e-06.pth.tar"
    args = launch.parse_args("retrain", ["--dummy", "--baseline_model", NAME, "--registry", str(registry),
                                         "--pruning_threshold", "0.1"])
    assert small_model_path(args, "conv12") == folder / "small_model_conv12_0.1.pth.tar"
    assert load_compressed_model(folder / "small_model_conv12_0.1.pth.tar")[1]["mask"]["threshold"] == 0.1


def test_distilling_names_the_torchvision_weights_the_originals_search_started_from(originals, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    args = launch.parse_args("retrain", ["--dummy", "--baseline_model", NAME, "--distill",
                                         "--registry", str(originals["conv12"][0].parent / "list_of_models.py")])
    with pytest.raises(UserError, match=f"started from --pretrained torchvision, but {tmp_path}/hub/checkpoints/"
                                        f"resnet50-0676ba61.pth is not there"):
        searchs_starting_weights(args.baseline_model, args.registry)


@pytest.mark.slow
def test_retrain_starts_from_the_originals_conv12_model(originals, tmp_path):
    folder = originals["conv12"][0]
    result = run_script("main_reduce_retrain_conv12.py", *TINY, "--lr", "0.01", "--baseline_model", NAME,
                        "--registry", str(folder.parent / "list_of_models.py"), "--path_to_save", str(tmp_path))
    assert f"compressed resnet50 (conv12) from {folder / 'small_model_conv12_1e-06.pth.tar'}" in result.stdout
    assert "inherited weights, before retraining: top1" in result.stdout
    assert "retraining done" in result.stdout


@pytest.mark.slow
def test_evaluating_the_originals_all_conv_model(originals, tmp_path):
    folder = originals["all_conv"][0]
    result = run_script("main_reduce_retrain_all_conv.py", *TINY, "--evaluate",
                        "--baseline_model", "pretrained_all_conv_mu_0_09",
                        "--registry", str(folder.parent / "list_of_models.py"), "--path_to_save", str(tmp_path))
    assert "inherited weights, before retraining: top1" in result.stdout


@pytest.mark.slow
def test_retraining_the_originals_model_with_the_other_scripts_scope_is_refused(originals, tmp_path):
    result = run_script("main_reduce_retrain_all_conv.py", *TINY, "--baseline_model", NAME,
                        "--registry", str(originals["conv12"][0].parent / "list_of_models.py"),
                        "--path_to_save", str(tmp_path), expect=2)
    assert "was searched with scope conv12; use main_reduce_retrain_conv12.py" in result.stderr
    assert result.stderr.count("\n") == 1 and not any(tmp_path.iterdir())


# --- export --------------------------------------------------------------------------------------------

def exported_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.name.endswith((".torchscript.pt", ".onnx")))


@pytest.mark.parametrize("scope", PRUNED_CONVS)
@pytest.mark.slow
def test_export_writes_an_original_search_folder(copied, capsys, scope):
    folder = copied / FOLDER[scope]
    export_main([str(folder), "--format", "torchscript", "--image-size", str(IMAGE_SIZE)])
    output = capsys.readouterr().out
    assert f"resnet50 ({scope}, {CLASSES} classes) from {folder / f'small_model_{scope}_1e-06.pth.tar'}" in output
    assert exported_files(copied) == [folder / f"small_model_{scope}_1e-06.torchscript.pt"]


@pytest.mark.slow
def test_export_finds_the_mask_of_an_original_retrain_through_the_registry(copied, capsys):
    retrain = copied / f"retrain_resnet50_{NAME}_20211105-074034"
    write_retrain_folder(retrain, copied / FOLDER["conv12"], NAME)
    export_main([str(retrain), "--format", "torchscript", "--image-size", str(IMAGE_SIZE),
                 "--registry", str(copied / "list_of_models.py")])
    assert f"resnet50 (conv12, {CLASSES} classes) from {retrain / 'model_best.pth.tar'}" in capsys.readouterr().out
    assert exported_files(copied) == [retrain / "model_best.torchscript.pt"]
    model, info = load_compressed_model(retrain / "checkpoint.pth.tar", copied / "list_of_models.py")
    assert info["epoch"] == 1
    small, _ = load_compressed_model(copied / FOLDER["conv12"])
    assert all(torch.equal(value, small.state_dict()[key]) for key, value in model.state_dict().items())


def export_refused(capsys, folder: Path, *flags: str) -> str:
    """export.py on ``folder`` must exit 2 with one line on stderr, writing nothing."""
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(folder), "--format", "torchscript", "--image-size", str(IMAGE_SIZE), *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    assert exported_files(folder.parent) == []
    return error


class RunsAShellCommand:
    """Unpickling this runs ``touch marker``: what a malicious mask file would do to np.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_mask_is_refused_and_does_not_run(copied, capsys):
    folder = copied / FOLDER["conv12"]
    marker = copied / "ran"
    mask = object_array(original_mask(0, EMPTIED["conv12"]))
    mask[0][0][0] = RunsAShellCommand(marker)
    np.save(folder / MASK_FILE, mask, allow_pickle=True)
    assert b"system" in (folder / MASK_FILE).read_bytes()
    error = export_refused(capsys, folder)
    assert f"{folder / MASK_FILE} was refused for safety (it asks for posix.system)" in error
    assert not marker.exists()


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-200])


def kept_indices_instead_of_flags(path: Path) -> None:
    mask = [[[np.flatnonzero(row) for row in block] for block in layer] for layer in original_mask(0, (0, 0, 0))]
    path.write_bytes(npy_as_numpy_1_19_wrote_it(object_array(mask)))


def three_layers(path: Path) -> None:
    path.write_bytes(npy_as_numpy_1_19_wrote_it(object_array(original_mask(0, (0, 0, 0))[:3])))


def floats(path: Path) -> None:
    np.save(path, np.zeros(4))


def a_string_inside(path: Path) -> None:
    mask = object_array(original_mask(0, (0, 0, 0)))
    mask[1][0][2] = "all"
    path.write_bytes(npy_as_numpy_1_19_wrote_it(mask))


def not_npy(path: Path) -> None:
    path.write_text("mask = [[1, 0]]\n")


@pytest.mark.parametrize("damage, message", [
    (truncated, "is truncated or corrupt"),
    (kept_indices_instead_of_flags, "the entry of layer1.0.conv1 must flag each of its 64 filters with 0 or 1"),
    (three_layers, "the mask has 3 layers, resnet50 has 4"),
    (floats, "holds an array of float64"),
    (a_string_inside, "holds a str, where the original's mask has only 0/1 flags"),
    (not_npy, "is not a readable .npy file"),
])
def test_a_malformed_mask_is_refused_in_one_line(copied, capsys, damage, message):
    folder = copied / FOLDER["conv12"]
    damage(folder / MASK_FILE)
    assert message in export_refused(capsys, folder)


@pytest.mark.slow
def test_weights_that_do_not_fit_the_mask_are_refused_in_one_line(copied, capsys):
    folder = copied / FOLDER["conv12"]
    path = folder / "small_model_conv12_1e-06.pth.tar"
    weights = torch.load(path, weights_only=True)["small_model"]
    weights["layer2.0.conv1.weight"] = weights["layer2.0.conv1.weight"][1:]
    torch_1_4_save({"small_model": weights}, path)
    error = export_refused(capsys, folder)
    assert "its weights do not fit: its layer2.0.conv1.weight has shape" in error


def test_a_missing_mask_is_named(copied, capsys):
    folder = copied / FOLDER["all_conv"]
    (folder / MASK_FILE).unlink()
    assert f"its mask {MASK_FILE}, which the original saves beside it, is not in {folder}" in export_refused(
        capsys, folder)


# --- the original's list_of_models.py -------------------------------------------------------------------

def test_registering_into_the_originals_registry_appends_models_and_keeps_its_lines(copied, tmp_path):
    registry = copied / "list_of_models.py"
    before = registry.read_text()
    ours = tmp_path / "ours"
    ours.mkdir()
    torch.save({"scope": "conv12", "arch": "resnet18", "state_dict": {}}, ours / "small_model_conv12_1e-06.pth.tar")
    (ours / "mask_conv12_1e-06.json").write_text("{}")
    register("mine", ours, "small_model_conv12_1e-06.pth.tar", "mask_conv12_1e-06.json", "conv12", "resnet18",
             path=registry)
    assert registry.read_text().startswith(before + "MODELS = {\n")
    assert list(read_registry(registry)) == [NAME, "pretrained_all_conv_mu_0_09", "mine"]
    assert resolve("mine", registry).arch == "resnet18"
    with pytest.raises(UserError, match=f"has {NAME!r} on line 1, a line {NAME} = 'folder' that is kept as written"):
        register(NAME, ours, "small_model_conv12_1e-06.pth.tar", "mask_conv12_1e-06.json", "conv12", "resnet18",
                 path=registry, overwrite=True)
    with pytest.raises(UserError, match="kept as written; remove it by hand"):
        unregister(NAME, registry)
    unregister("mine", registry)
    assert registry.read_text() == before + "MODELS = {}\n"


def test_a_line_may_name_one_of_our_search_folders_too(tmp_path):
    folder = tmp_path / "conv12_run"
    folder.mkdir()
    torch.save({"scope": "all_conv", "arch": "resnet18", "state_dict": {}},
               folder / "small_model_all_conv_1e-06.pth.tar")
    (folder / "mask_all_conv_1e-06.json").write_text("{}")
    registry = originals_registry(tmp_path, {"run": "conv12_run"})
    entry = resolve("run", registry)
    assert (entry.scope, entry.arch, entry.mask) == ("all_conv", "resnet18", folder / "mask_all_conv_1e-06.json")


def test_a_line_whose_folder_has_no_compressed_model_is_named(tmp_path):
    (tmp_path / "empty_search").mkdir()
    registry = originals_registry(tmp_path, {"run": "empty_search"})
    with pytest.raises(UserError, match="holds no small_model_<conv12|all_conv>_<threshold>.pth.tar"):
        resolve("run", registry)
