"""Adaptive BatchNorm: a compressed model's statistics re-estimated on fixed training images,
and the search's epoch-end figures that use it."""
import pytest
import torch
from scripts import TINY, only_folder, run_script
from torch import nn
from torch.utils.data import TensorDataset

from gsparsity.bn_calibration import calibration_loader, recalibrate_batchnorm
from gsparsity.checkpoint import load_checkpoint
from gsparsity.data import SeededSamples
from gsparsity.distributed import DistContext

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def conv_bn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def batches_of(images: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(chunk, torch.zeros(len(chunk), dtype=torch.long)) for chunk in images.split(size)]


def test_the_statistics_become_the_plain_average_over_the_batches_and_nothing_else_changes():
    model = conv_bn()
    bn = model[1]
    bn.running_mean.fill_(100.0)  # what a search leaves: statistics far from the weights'
    bn.running_var.fill_(1e4)
    weights = dict(model.named_parameters())
    weights = {name: value.detach().clone() for name, value in weights.items()}
    images = torch.randn(12, 3, 6, 6) * 3 + 1
    recalibrate_batchnorm(model, batches_of(images, 4), CPU)
    with torch.no_grad():
        features = [model[0](chunk) for chunk in images.split(4)]
    means = torch.stack([f.mean(dim=(0, 2, 3)) for f in features])
    variances = torch.stack([f.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for f in features])
    # the mean of the three batch figures: a cumulative average, not an exponential one
    torch.testing.assert_close(bn.running_mean, means.mean(dim=0))
    torch.testing.assert_close(bn.running_var, variances.mean(dim=0))
    assert bn.momentum == 0.1 and not model.training
    for name, value in model.state_dict().items():
        if name in weights:
            assert torch.equal(value, weights[name]), name


def test_recalibrated_statistics_give_the_eval_output_that_train_mode_gives_on_the_same_batch():
    model = conv_bn()
    model[1].running_var.fill_(1e4)
    images = torch.randn(16, 3, 6, 6)
    with torch.no_grad():
        train_output = model.train()(images)
    recalibrate_batchnorm(model, batches_of(images, 16), CPU)
    with torch.no_grad():
        eval_output = model(images)
    # eval divides by the unbiased variance, train by the biased one: 16 * 16 values a channel
    values = 16 * 4 * 4
    torch.testing.assert_close(eval_output * (values / (values - 1)) ** 0.5, train_output, atol=1e-4, rtol=1e-4)


def digits_like(count: int) -> SeededSamples:
    """A dataset that, like the training loader's, takes (index, seed) keys; its images are
    random draws from torch's generator, so a key's seed decides the image."""
    class Drawn(torch.utils.data.Dataset):
        def __len__(self):
            return count

        def __getitem__(self, index):
            return torch.rand(3, 2, 2) + index, index

    return SeededSamples(Drawn())


def test_the_calibration_images_are_the_same_at_every_call_and_leave_the_random_state_alone():
    dataset = digits_like(100)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = [batch for batch in calibration_loader(dataset, 20, 8, CPU)]
    second = [batch for batch in calibration_loader(dataset, 20, 8, CPU)]
    assert torch.equal(torch.get_rng_state(), state)
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    indices = torch.cat([labels for _, labels in first]).tolist()
    assert indices == list(range(0, 100, 5))  # evenly spaced through the training set


def test_processes_share_the_calibration_images_without_overlap_and_no_batch_holds_one_image():
    dataset = digits_like(50)
    shares = [[int(index) for _, labels in calibration_loader(dataset, 17, 4, DistContext(rank, 2, rank, CPU.device))
               for index in labels] for rank in (0, 1)]
    assert not set(shares[0]) & set(shares[1])
    assert len(shares[0]) + len(shares[1]) >= 16
    for rank in (0, 1):
        sizes = [len(labels) for _, labels in calibration_loader(dataset, 17, 4, DistContext(rank, 2, rank, CPU.device))]
        assert 1 not in sizes, sizes


@pytest.mark.slow
def test_every_search_epoch_logs_the_compressed_models_top1_raw_and_recalibrated(baseline, tmp_path):
    run_script("main_search_conv12.py", *TINY, "--epochs", "2", "--pretrained", str(baseline), "--lr", "1",
               "--weight_decay", "3", "--bn-calibration-images", "24", "--path_to_save", str(tmp_path))
    folder = only_folder(tmp_path, "conv12_*")
    log = (folder / "_log.txt").read_text()
    for epoch in (0, 1):
        line = next(line for line in log.splitlines() if f"epoch {epoch} compressed model: val top1" in line)
        assert "(BatchNorm statistics as trained)" in line
        assert "(BatchNorm recalibrated on 24 training images)" in line
    saved = load_checkpoint(only_folder(folder, "small_model_conv12_1e-06.pth.tar"))
    assert 0 <= saved["val_top1_compressed"] <= 100 and 0 <= saved["val_top1_recalibrated"] <= 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"val/compressed_top1", "val/compressed_top1_recalibrated"} <= set(tags)
    assert [event.step for event in events.Scalars("val/compressed_top1_recalibrated")] == [0, 1]


@pytest.mark.slow
def test_without_calibration_images_only_the_raw_figure_is_logged(baseline, tmp_path):
    run_script("main_search_conv12.py", *TINY, "--pretrained", str(baseline), "--bn-calibration-images", "0",
               "--path_to_save", str(tmp_path))
    folder = only_folder(tmp_path, "conv12_*")
    line = next(line for line in (folder / "_log.txt").read_text().splitlines()
                if "epoch 0 compressed model: val top1" in line)
    assert "recalibrated" not in line
    assert load_checkpoint(only_folder(folder, "small_model_conv12_1e-06.pth.tar"))["val_top1_recalibrated"] is None
