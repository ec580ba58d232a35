"""The search's optimizer: settings fixed at parse time, one builder for the search and the budget's probes."""
import dataclasses
import json

import pytest
import torchvision

from gsparsity import launch
from gsparsity.cli import build_parser
from gsparsity.search_optimizer import ProxSettings, search_optimizer


def search_flags(*flags: str):
    return build_parser("search").parse_args(["--dummy", *flags])


@pytest.mark.parametrize("spelling", ["--mu", "--weight_decay", "--wd", "--weight-decay"])
def test_the_search_takes_mu_under_its_own_name_and_the_originals(spelling):
    assert search_flags(spelling, "0.3").mu == 0.3


def test_retrain_keeps_weight_decay_as_l2_and_has_no_mu(capsys):
    args = build_parser("retrain").parse_args(["--dummy", "--weight_decay", "5e-4"])
    assert args.weight_decay == 5e-4 and not hasattr(args, "mu")
    with pytest.raises(SystemExit):
        build_parser("retrain").parse_args(["--dummy", "--mu", "0.1"])
    assert "--mu" in capsys.readouterr().err


@pytest.mark.parametrize("scope, doubled", [("conv12", True), ("all_conv", False)])
def test_layer_adaptive_defaults_by_scope_as_the_originals_two_scripts(scope, doubled):
    assert ProxSettings.from_args(search_flags(), scope).layer_adaptive is doubled
    assert ProxSettings.from_args(search_flags("--no-layer_adaptive"), scope).layer_adaptive is False


def test_settings_cannot_change_once_made_and_a_new_mu_is_a_new_settings():
    settings = ProxSettings.from_args(search_flags("--mu", "0.2"), "conv12")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.mu = 1.0
    assert settings.with_mu(1.0).mu == 1.0 and settings.mu == 0.2


def test_the_optimizer_gives_each_prunable_conv_mu_doubled_in_layer2_and_layer3():
    model = torchvision.models.resnet18(num_classes=10)
    settings = ProxSettings.from_args(search_flags("--mu", "0.2", "--lr", "0.01", "--momentum", "0.5"), "conv12")
    optimizer = search_optimizer(model, settings)
    gains = {group["name"]: group["weight_decay"] for group in optimizer.param_groups}
    assert gains["layer1.0.conv1"] == 0.2 and gains["layer4.1.conv1"] == 0.2
    assert gains["layer2.0.conv1"] == gains["layer3.1.conv1"] == pytest.approx(0.4)
    assert {group["lr"] for group in optimizer.param_groups} == {0.01}
    assert {group["momentum"] for group in optimizer.param_groups} == {0.5}


def test_a_search_recorded_with_weight_decay_resumes_with_that_mu(tmp_path):
    """run_info.json of searches made before --mu existed names it weight_decay."""
    (tmp_path / "run_info.json").write_text(json.dumps({"args": {"weight_decay": 0.7, "lr": 0.002}}))
    resumed = launch.parse_args("search", ["--resume", str(tmp_path)])
    assert resumed.mu == 0.7 and resumed.lr == 0.002
