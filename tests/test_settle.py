"""--settle-epochs: the search makes the budget's mask final before it ends and trains its last
epochs without the filters it cuts, so that it ends with them as zero filters and its compressed
model is exact."""
import pytest
import torch

import main_search_conv12
from gsparsity.checkpoint import load_checkpoint
from gsparsity.compression import compress_model, compressed_model_file
from gsparsity.masks import compute_mask, load_mask
from gsparsity.settle import CutFilters
from gsparsity.stopping import EXIT_PREEMPTED
from gsparsity.structure import prunable_convs
from gsparsity.training import CHECKPOINT
from scripts import main_in_process, only_folder
from test_compression import full_model, random_mask
from test_reliability import same_weights, sigterm_at

SEARCH = ("search", main_search_conv12.workflow)


@pytest.mark.parametrize("scope", ["conv12", "all_conv"])
def test_cut_filters_give_zero_output_and_stay_cut_while_training_and_the_model_compresses_exactly(scope):
    model = full_model("resnet50", seed=0)
    mask = random_mask(model, scope, seed=1)  # one layer loses every filter: its block's branch goes
    images = torch.randn(4, 3, 32, 32)
    cut = CutFilters(model, mask, scope)
    for conv in prunable_convs(model, scope):  # zero filters from the start
        pruned = ~mask[conv.name]
        assert torch.count_nonzero(conv.conv.weight[pruned]) == 0 and torch.count_nonzero(conv.bn.bias[pruned]) == 0
    # Training moves the cut filters again (momentum, here a nudge); the hooks keep their output at zero.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    with torch.no_grad():
        for conv in prunable_convs(model, scope):
            conv.bn.bias.add_(0.5)
    model(images).square().mean().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        hooked = model(images)
        cut.finish()
        assert cut.handles == []
        assert torch.allclose(model(images), hooked, atol=1e-5)  # the zeros now do the hooks' job
        by_threshold = compute_mask(model, 1e-12, scope)
        for conv in prunable_convs(model, scope):
            assert not (by_threshold[conv.name] & ~mask[conv.name]).any(), conv.name  # every cut filter is zero
        small = compress_model(model, mask, scope, arch="resnet50")
        assert torch.allclose(small(images), hooked, atol=1e-4)


QUICK = ["--data", "demo", "--image-size", "16", "--subset", "32", "-b", "8", "-j", "0", "--epochs", "2",
         "-p", "1", "--seed", "0", "-a", "resnet18", "--lr", "0.5", "--no-adaptive_lr", "--normalization", "none",
         "--target-macs", "60%", "--budget-steps", "2", "--budget-probes", "1", "--settle-epochs", "1",
         "--bn-calibration-images", "16"]


@pytest.mark.slow
def test_a_settled_search_ends_with_an_exact_compressed_model_and_resumes_while_settling_as_if_never_stopped(
        tmp_path, capsys, monkeypatch, one_thread):
    main_in_process(*SEARCH, [*QUICK, "--path_to_save", str(tmp_path / "straight")])
    straight = only_folder(tmp_path / "straight", "conv12_*")
    log = (straight / "_log.txt").read_text()
    assert "epoch 0: this budget mask is final; the network trains without the filters it cuts for the last 1 epoch(s)" in log
    small = torch.load(compressed_model_file(straight), weights_only=True)
    # Exact: the compressed model scores what the search's model scores, BatchNorm as trained.
    assert small["val_top1_compressed"] == small["val_top1_full"]
    final_mask, _ = load_mask(straight / "mask_conv12_1e-06.json")
    weights = load_checkpoint(straight / CHECKPOINT)
    assert weights["settled_mask"].keys() == final_mask.keys()
    for name, row in final_mask.items():
        assert torch.equal(weights["settled_mask"][name], row), name
    assert sum(int((~row).sum()) for row in final_mask.values()) > 0
    for name, row in final_mask.items():  # the cut filters are zero filters in the saved weights
        assert torch.count_nonzero(weights["state_dict"][f"{name}.weight"][~row]) == 0, name

    # Stopped by SIGTERM while settling, then resumed: the weights of the straight run.
    sigterm_at("epoch 1 [2/4]", monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main_in_process(*SEARCH, [*QUICK, "--path_to_save", str(tmp_path / "stopped")])
    assert exit_info.value.code == EXIT_PREEMPTED
    monkeypatch.undo()
    stopped = only_folder(tmp_path / "stopped", "conv12_*")
    saved = load_checkpoint(stopped / CHECKPOINT)
    assert (saved["epoch"], saved["step"]) == (1, 2)
    main_in_process(*SEARCH, ["--resume", str(stopped)])
    assert same_weights(stopped, straight) == []
