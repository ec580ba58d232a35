"""--distill: the retrain learns from the unpruned model too (gsparsity/distill.py)."""
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from scripts import TINY, only_folder, run_script, scratch_folder
from test_cli import RETRAIN, fails_with
from torch import nn

from gsparsity import engine
from gsparsity.engine import LoopSettings
from gsparsity.checkpoint import load_checkpoint
from gsparsity.distill import DistillationLoss, distillation_loss, load_teacher
from gsparsity.distributed import DistContext
from gsparsity.errors import UserError
from gsparsity.registry import register

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
RETRAIN_SCRIPT = "main_reduce_retrain_conv12.py"


def retrain_flags(search_folder: Path, save: Path) -> list[str]:
    """The flags of search_and_retrain's own retrain (conftest.py), saving under ``save``."""
    return [*TINY, "--lr", "0.01", "--baseline_model", "tiny", "--registry",
            str(search_folder.parent / "list_of_models.py"), "--path_to_save", str(save)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def distilled(search_and_retrain, baseline, tmp_path_factory) -> Iterator[dict[str, Path]]:
    """The retrain of search_and_retrain, distilling with weight 0 from the search's starting
    weights (--distill without PATH) and with the default weight from the same file named
    (--distill PATH): {"weight 0": folder, "weight 0.5": folder, "teacher sha256": ...}."""
    search, _ = search_and_retrain
    before = sha256(baseline)
    cache = str(tmp_path_factory.getbasetemp() / "cache")
    with scratch_folder(tmp_path_factory, "distilled") as parent:
        run_script(RETRAIN_SCRIPT, *retrain_flags(search, parent / "weight0"), "--distill",
                   "--distill-weight", "0", GSPARSITY_CACHE=cache)
        run_script(RETRAIN_SCRIPT, *retrain_flags(search, parent / "weighted"), "--distill", str(baseline),
                   GSPARSITY_CACHE=cache)
        yield {"weight 0": only_folder(parent / "weight0", "retrain_*"),
               "weight 0.5": only_folder(parent / "weighted", "retrain_*"), "teacher sha256": before}


def test_the_distillation_loss_is_the_formula_on_hand_made_logits():
    student = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    teacher = torch.tensor([[1.0, 0.0, -1.0], [-0.5, 4.0, 1.0]])
    target = torch.tensor([0, 2])
    temperature, weight, smoothing = 3.0, 0.3, 0.1

    def softmax(row, t):
        exps = [math.exp(value / t) for value in row]
        return [value / sum(exps) for value in exps]

    kl = cross_entropy = 0.0
    for s_row, t_row, label in zip(student.tolist(), teacher.tolist(), target.tolist()):
        p_student, p_teacher = softmax(s_row, temperature), softmax(t_row, temperature)
        kl += sum(pt * math.log(pt / ps) for pt, ps in zip(p_teacher, p_student)) / 2
        log_p = [math.log(p) for p in softmax(s_row, 1.0)]
        cross_entropy -= ((1 - smoothing) * log_p[label] + smoothing * sum(log_p) / 3) / 2
    expected = (1 - weight) * cross_entropy + weight * temperature ** 2 * kl
    loss = distillation_loss(student, teacher, target, temperature, weight, smoothing)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Through the criterion: the teacher runs on the images the watched model saw.
    criterion = DistillationLoss(Lookup(teacher), temperature, weight, smoothing)
    model = Lookup(student)
    criterion.watch(model)
    assert criterion(model(torch.tensor([0, 1])), target).item() == pytest.approx(expected, rel=1e-6)


class Lookup(nn.Module):
    """Row i of ``table`` for input i: logits chosen by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.table[indices]


def test_the_teacher_keeps_its_weights_and_statistics_and_stays_out_of_the_optimizer():
    torch.manual_seed(0)

    def small_net():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 3))
    student, teacher = small_net(), small_net()
    teacher_before = {key: value.clone() for key, value in teacher.state_dict().items()}
    criterion = DistillationLoss(teacher, temperature=4.0, weight=0.5)
    criterion.watch(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5, momentum=0.9)
    batches = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])) for _ in range(3)]
    args = LoopSettings(print_freq=1)
    student_before = student[0].weight.clone()
    criterion.train()  # whatever is switched to training, the teacher is not
    engine.train_one_epoch(student, batches, criterion, optimizer, None, CPU, 0, args)
    assert not torch.equal(student[0].weight, student_before)  # the student did learn
    assert not teacher.training
    for key, value in teacher.state_dict().items():  # BatchNorm running statistics included
        assert torch.equal(value, teacher_before[key]), key
    assert all(parameter.grad is None for parameter in teacher.parameters())
    trained = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    assert trained.isdisjoint(id(parameter) for parameter in teacher.parameters())


@pytest.mark.slow
def test_distilling_with_weight_0_trains_exactly_what_plain_retraining_does_and_with_0_5_something_else(
        search_and_retrain, distilled):
    plain = load_checkpoint(search_and_retrain[1] / "checkpoint.pth.tar")["state_dict"]
    for key, value in load_checkpoint(distilled["weight 0"] / "checkpoint.pth.tar")["state_dict"].items():
        assert torch.equal(value, plain[key]), key
    weighted = load_checkpoint(distilled["weight 0.5"] / "checkpoint.pth.tar")["state_dict"]
    assert weighted.keys() == plain.keys()
    assert not all(torch.equal(value, plain[key]) for key, value in weighted.items())


@pytest.mark.slow
def test_the_teacher_file_is_untouched_and_the_checkpoint_holds_the_student_alone(
        search_and_retrain, distilled, baseline):
    assert sha256(baseline) == distilled["teacher sha256"]
    plain = load_checkpoint(search_and_retrain[1] / "checkpoint.pth.tar")
    for folder in (distilled["weight 0"], distilled["weight 0.5"]):
        saved = load_checkpoint(folder / "checkpoint.pth.tar")
        assert saved.keys() == plain.keys()
        assert saved["state_dict"].keys() == plain["state_dict"].keys()
        assert len(saved["optimizer"]["state"]) == len(plain["optimizer"]["state"])


def test_distill_without_a_path_takes_the_weights_the_search_started_from(distilled, baseline):
    info = json.loads((distilled["weight 0"] / "run_info.json").read_text())
    assert info["distill"] == {"teacher": str(baseline.resolve()), "arch": "resnet50", "temperature": 4.0,
                               "weight": 0.0}
    assert f"distilling from the unpruned resnet50 in {baseline.resolve()} (temperature 4, weight 0)" \
        in (distilled["weight 0"] / "_log.txt").read_text()
    assert json.loads((distilled["weight 0.5"] / "run_info.json").read_text())["distill"]["weight"] == 0.5


def fake_search(registry: Path, folder: Path, pretrained: str | None) -> None:
    """A registered conv12 search folder whose run_info.json says it started from ``pretrained``."""
    folder.mkdir(parents=True)
    torch.save({}, folder / "small_model_conv12_1e-06.pth.tar")
    (folder / "mask_conv12_1e-06.json").write_text("{}")
    (folder / "run_info.json").write_text(json.dumps({"args": {"pretrained": pretrained, "arch": "resnet50"}}))
    register("run", folder, "small_model_conv12_1e-06.pth.tar", "mask_conv12_1e-06.json", "conv12", "resnet50",
             path=registry)


@pytest.mark.parametrize("pretrained, distill, message", [
    (None, [], "the search behind run started without --pretrained weights, so there is no unpruned "
               "model to start from; name the unpruned model with --distill PATH"),
    ("gone.pth.tar", [], "started from --pretrained gone.pth.tar, but gone.pth.tar is not there; "
                         "name the unpruned model with --distill PATH"),
    (None, ["missing.pth"], "--distill missing.pth: no such file"),
], ids=["search without --pretrained", "search's weights gone", "no such PATH"])
def test_a_missing_teacher_is_one_line_and_exit_2_before_any_folder(capsys, registry, tmp_path, monkeypatch,
                                                                     pretrained, distill, message):
    monkeypatch.chdir(tmp_path)
    fake_search(registry, tmp_path / "conv12_run", pretrained)
    fails_with(capsys, RETRAIN, ["--dummy", "--baseline_model", "run", "--registry", str(registry),
                                 "--path_to_save", str(tmp_path / "saved"), "--distill", *distill], message)
    assert not (tmp_path / "saved").exists()


def test_a_teacher_whose_classifier_knows_other_classes_is_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), path)
    with pytest.raises(UserError, match=r"classifies 1000 classes, the data has 10; name a model trained"):
        load_teacher(path, "resnet18", 10, torch.device("cpu"), channels_last=False)


@pytest.mark.parametrize("flags, message", [
    (["--distill", "--distill-weight", "1.5"], "--distill-weight must be in [0, 1], got 1.5"),
    (["--distill", "--distill-temperature", "0"], "--distill-temperature must be > 0, got 0.0"),
    (["--distill-weight", "0.9"], "--distill-temperature and --distill-weight need --distill [PATH]"),
])
def test_distillation_settings_out_of_range_are_refused_in_one_line(capsys, flags, message):
    fails_with(capsys, RETRAIN, ["--dummy", "--baseline_model", "run", *flags], message)
