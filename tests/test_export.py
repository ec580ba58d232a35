"""Export: the compressed model rebuilt from its own checkpoint, written as TorchScript and ONNX
that compute what PyTorch computes, at any batch size; refusals of what is not ours."""
from collections.abc import Iterator

import pytest
import torch
from numerics import eval_output, relative_deviation
from scripts import scratch_folder
from torch import nn

from gsparsity.checkpoint import atomic_save, load_checkpoint
from gsparsity.errors import UserError
from gsparsity.compression import load_compressed_model
from gsparsity.export import export_compressed_model, main, output_paths
from gsparsity.masks import mask_from_record, mask_to_record, reference_model
from gsparsity.pruned_resnet import ShortcutOnlyBlock, build_pruned_resnet
from gsparsity.structure import prunable_convs

RELATIVE_TOLERANCE = 1e-4
IMAGE_SIZE, EXPORT_BATCH, OTHER_BATCH = 32, 2, 3
ARCH, CLASSES = "resnet18", 10


def random_mask(scope: str) -> dict[str, torch.Tensor]:
    """About half the filters of every prunable conv, one layer pruned entirely."""
    mask = {prunable.name: torch.rand(prunable.conv.out_channels) < 0.5
            for prunable in prunable_convs(reference_model(ARCH, CLASSES), scope)}
    mask[next(iter(mask))][:] = False  # layer1.0 loses its branch (a ShortcutOnlyBlock)
    return mask


def randomised(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and residual biases, so that every buffer reaches the output."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith(("running_mean", "residual_bias")):
                buffer.copy_(0.1 * torch.randn_like(buffer))
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def small_model_files(tmp_path_factory) -> Iterator[dict]:
    """{scope: a small-model file as a search writes it, of a randomly pruned ResNet-18}."""
    files = {}
    with scratch_folder(tmp_path_factory, "small_models") as folder:
        for scope in ("conv12", "all_conv"):
            torch.manual_seed(0)
            mask = random_mask(scope)
            model = randomised(build_pruned_resnet(ARCH, mask, scope, CLASSES))
            (folder / scope).mkdir()
            files[scope] = folder / scope / f"small_model_{scope}_1e-06.pth.tar"
            atomic_save({"epoch": 3, "arch": ARCH, "scope": scope, "num_classes": CLASSES,
                         "mask": mask_to_record(mask, ARCH, scope, 1e-6), "state_dict": model.state_dict()},
                        files[scope])
        yield files


@pytest.fixture(scope="module", params=["conv12", "all_conv"])
def small_model_file(request, small_model_files):
    return small_model_files[request.param]


@pytest.fixture(scope="module")
def exported(small_model_file):
    """Both formats exported into the small model's folder at the test's image and batch size."""
    return export_compressed_model(small_model_file, image_size=IMAGE_SIZE, batch_size=EXPORT_BATCH)


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(OTHER_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.fixture(scope="module")
def tiny_runs(search_and_retrain):
    return search_and_retrain


@pytest.mark.slow
def test_load_compressed_model_rebuilds_the_saved_weights_from_the_mask_inside(small_model_file):
    model, info = load_compressed_model(small_model_file)
    saved = load_checkpoint(small_model_file)
    assert not model.training
    assert (info["arch"], info["scope"], info["num_classes"]) == (ARCH, saved["scope"], CLASSES)
    assert model.state_dict().keys() == saved["state_dict"].keys()
    for key, value in saved["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_residual_biases_are_part_of_the_exported_model(small_model_file):
    """Every all_conv block has one; a conv12 model only where a branch was dropped."""
    model, info = load_compressed_model(small_model_file)
    biases = [buffer for name, buffer in model.named_buffers() if name.endswith("residual_bias")]
    assert len(biases) == (8 if info["scope"] == "all_conv" else 1)
    assert all(bias.abs().sum() > 0 for bias in biases)  # the fixture made them matter


def test_a_saved_model_with_a_dropped_branch_is_rebuilt_without_it(small_model_file):
    model, _ = load_compressed_model(small_model_file)
    assert isinstance(model.layer1[0], ShortcutOnlyBlock)
    assert not any(name.startswith("layer1.0.conv") for name in model.state_dict())


def test_a_file_that_kept_one_channel_for_an_empty_layer_is_refused_saying_why(small_model_files, tmp_path):
    """Before branches were dropped, a layer keeping no filter kept channel 0 instead."""
    saved = load_checkpoint(small_model_files["conv12"])
    mask = mask_from_record(saved["mask"])
    one_channel = {name: row.clone() for name, row in mask.items()}
    one_channel["layer1.0.conv1"][0] = True
    saved["state_dict"] = build_pruned_resnet(ARCH, one_channel, "conv12", CLASSES).state_dict()
    atomic_save(saved, tmp_path / "small_model_conv12_1e-06.pth.tar")
    with pytest.raises(UserError, match=r"layer1\.0\.conv1\) still had one channel.*compress the search's full "
                                        r"model again"):
        load_compressed_model(tmp_path / "small_model_conv12_1e-06.pth.tar")


@pytest.mark.slow
def test_onnx_file_matches_pytorch_at_another_batch_size(exported, images):
    import onnxruntime

    model, _ = load_compressed_model(exported.info["path"])
    session = onnxruntime.InferenceSession(str(exported.files["onnx"]), providers=["CPUExecutionProvider"])
    (input_spec,) = session.get_inputs()
    (logits,) = session.run(None, {input_spec.name: images.numpy()})
    assert logits.shape == (OTHER_BATCH, CLASSES)
    assert relative_deviation(eval_output(model, images), torch.from_numpy(logits)) <= RELATIVE_TOLERANCE


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
@pytest.mark.slow
def test_torchscript_file_matches_pytorch_at_another_batch_size(exported, images):
    model, _ = load_compressed_model(exported.info["path"])
    loaded = torch.jit.load(str(exported.files["torchscript"]))
    assert relative_deviation(eval_output(model, images), eval_output(loaded, images)) <= RELATIVE_TOLERANCE


def test_export_checks_each_format_at_the_export_batch_and_one_more(exported):
    checked = {(deviation.export_format, deviation.batch_size) for deviation in exported.deviations}
    assert checked == {(export_format, batch) for export_format in ("torchscript", "onnx")
                       for batch in (EXPORT_BATCH, EXPORT_BATCH + 1)}
    assert all(deviation.relative <= RELATIVE_TOLERANCE for deviation in exported.deviations)


@pytest.mark.slow
def test_command_writes_the_asked_format_and_prints_the_deviations(small_model_file, tmp_path, capsys):
    main([str(small_model_file), "--format", "torchscript", "--out", str(tmp_path),
          "--image-size", str(IMAGE_SIZE), "--fuse-bn"])
    printed = capsys.readouterr().out
    assert "BatchNorm folded into the convs" in printed
    assert "torchscript, batch of 1: max abs deviation" in printed
    assert "torchscript, batch of 2: max abs deviation" in printed
    expected = small_model_file.name.replace(".pth.tar", ".torchscript.pt")
    assert [path.name for path in tmp_path.iterdir()] == [expected]


def batch_norms_in(torchscript_file) -> int:
    return sum("BatchNorm" in module.original_name for _, module in torch.jit.load(str(torchscript_file)).named_modules())


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")  # TorchScript is what is tested
@pytest.mark.slow
def test_fuse_bn_writes_torchscript_without_batchnorm_that_computes_the_same(small_model_file, tmp_path):
    for folder in ("plain", "folded"):
        (tmp_path / folder).mkdir()
    plain = export_compressed_model(small_model_file, ["torchscript"], tmp_path / "plain", IMAGE_SIZE, EXPORT_BATCH)
    folded = export_compressed_model(small_model_file, ["torchscript"], tmp_path / "folded", IMAGE_SIZE,
                                     EXPORT_BATCH, fold_bn=True)
    assert batch_norms_in(plain.files["torchscript"]) > 0 and batch_norms_in(folded.files["torchscript"]) == 0
    # Checked against the model as trained, BatchNorm and all.
    assert all(deviation.relative <= RELATIVE_TOLERANCE for deviation in folded.deviations)


@pytest.mark.slow
def test_existing_output_is_kept_unless_forced(small_model_files, tmp_path):
    source = small_model_files["conv12"]
    target = output_paths(tmp_path, source.name.replace(".pth.tar", ""), ["onnx"])["onnx"]
    target.write_bytes(b"someone else's file")
    with pytest.raises(UserError, match="already exists; use --force"):
        export_compressed_model(source, ["onnx"], tmp_path, IMAGE_SIZE)
    assert target.read_bytes() == b"someone else's file"
    export_compressed_model(source, ["onnx"], tmp_path, IMAGE_SIZE, force=True)
    assert target.read_bytes() != b"someone else's file"


@pytest.mark.slow
def test_an_export_that_deviates_exits_1_and_writes_nothing(small_model_files, tmp_path, monkeypatch, capsys):
    import gsparsity.export as export

    honest = export.run_exported
    monkeypatch.setattr(export, "run_exported", lambda *args: honest(*args) * 1.01)  # 1% off
    with pytest.raises(SystemExit) as exit_info:
        main([str(small_model_files["conv12"]), "--format", "torchscript", "--out", str(tmp_path),
              "--image-size", str(IMAGE_SIZE)])
    assert exit_info.value.code == 1
    assert "deviates from PyTorch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _not_a_compressed_model(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    return path, "is not a compressed model"


def _corrupt_file(tmp_path):
    path = tmp_path / "small_model_conv12_1e-06.pth.tar"
    path.write_bytes(b"\x80\x02 not a checkpoint")
    return path, "truncated or corrupt"


def _missing_file(tmp_path):
    return tmp_path / "nowhere.pth.tar", "no such file or folder"


def _folder_without_a_model(tmp_path):
    return tmp_path, "neither a search folder"


@pytest.mark.parametrize("bad_input", [_not_a_compressed_model, _corrupt_file, _missing_file,
                                       _folder_without_a_model])
def test_bad_input_gets_one_line_and_exit_status_2(bad_input, tmp_path, capsys):
    path, reason = bad_input(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert reason in error and error.count("\n") == 1 and "Traceback" not in error


@pytest.mark.slow
def test_load_compressed_model_finds_the_small_model_of_a_real_search_folder(tiny_runs):
    search, _ = tiny_runs
    (small_model_path,) = search.glob("small_model_*_1e-06.pth.tar")  # the search's own threshold
    model, info = load_compressed_model(search)
    assert info["path"] == small_model_path
    saved = load_checkpoint(small_model_path)
    for key, value in saved["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.slow
def test_load_compressed_model_reads_a_real_retrain_checkpoint(tiny_runs):
    _, retrain = tiny_runs
    model, info = load_compressed_model(retrain / "checkpoint.pth.tar")
    saved = load_checkpoint(retrain / "checkpoint.pth.tar")
    assert info["epoch"] == saved["epoch"] and info["mask"] == saved["mask"]
    for key, value in saved["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.slow
def test_a_model_with_broken_weights_is_refused_before_anything_is_written(small_model_files, tmp_path):
    saved = load_checkpoint(small_model_files["conv12"])
    saved["state_dict"]["fc.bias"][0] = float("nan")
    broken = tmp_path / "small_model_conv12_1e-06.pth.tar"
    atomic_save(saved, broken)
    with pytest.raises(UserError, match="outputs NaN or inf"):
        export_compressed_model(broken, ["torchscript"], image_size=IMAGE_SIZE)
    assert [path.name for path in tmp_path.iterdir()] == [broken.name]
