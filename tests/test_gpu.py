"""On a CUDA GPU: ProxSGD, compression and the workflow compute what they compute on the CPU.

Skipped where PyTorch sees no GPU (CI, the team's machines); run them with
``pytest -m gpu`` on a machine that has one."""
import copy
import re

import numerics
import pytest
import torch
import torchvision
from scripts import TINY, only_folder, run_script
from test_compression import full_model, plant_zeros, random_mask

from gsparsity.checkpoint import load_checkpoint
from gsparsity.compression import compress_model, full_fp32_convolutions
from gsparsity.structure import prunable_convs
from proxsgd import ProxSGD, group_model_parameters

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def small_resnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10)


def spread_filter_norms(model: torch.nn.Module) -> None:
    """Prunable filters with norms spread over [0, 2], so that a step prunes some of each layer."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prunable in prunable_convs(model, "conv12"):
            rows = prunable.conv.weight.flatten(1)
            norms = torch.rand(rows.shape[0], generator=generator) * 2
            prunable.conv.weight.copy_((rows / rows.norm(dim=1, keepdim=True) * norms[:, None]).view_as(prunable.conv.weight))


def small_gradients(model: torch.nn.Module, step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(param.shape, generator=generator) * 1e-3 for param in model.parameters()]


# Each mu prunes some filters of every layer in 4 steps, and not all (seen on the CPU).
@pytest.mark.parametrize("adaptive_lr, normalization, mu", [(False, None, 0.2), (True, "div", 1.0)])
def test_proxsgd_takes_the_same_steps_on_a_gpu_as_on_the_cpu(adaptive_lr, normalization, mu):
    cpu_model = small_resnet()
    spread_filter_norms(cpu_model)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    optimizers = [ProxSGD(group_model_parameters(model, mu=mu, layer_adaptive=False), lr=0.5,
                          adaptive_lr=adaptive_lr, normalization=normalization)
                  for model in (cpu_model, gpu_model)]
    for step in range(4):
        for model, optimizer in zip((cpu_model, gpu_model), optimizers):
            for param, grad in zip(model.parameters(), small_gradients(cpu_model, step)):
                param.grad = grad.to(param.device)
            optimizer.step()
    cpu_zero, gpu_zero = (optimizer.zero_prox_filters() for optimizer in optimizers)
    pruned = sum(int(rows.sum()) for rows in cpu_zero.values())
    assert 0 < pruned < sum(rows.numel() for rows in cpu_zero.values())  # the steps pruned for real
    for name, rows in cpu_zero.items():
        assert torch.equal(rows.cpu(), gpu_zero[name].cpu()), name
    for (name, cpu_param), gpu_param in zip(cpu_model.named_parameters(), gpu_model.parameters()):
        scale = cpu_param.abs().max().item() or 1.0
        assert (cpu_param - gpu_param.cpu()).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.parametrize("channels_last", [False, True])
def test_compression_on_a_gpu_is_exact(channels_last):
    full = full_model("resnet18")  # BatchNorms that are not the identity: every channel matters
    mask = random_mask(full, "conv12")  # about half of each layer; the first layer emptied
    plant_zeros(full, mask, "conv12", group="channel")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    full = full.cuda().to(memory_format=memory_format)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(4, 3, 64, 64, generator=generator).cuda().to(memory_format=memory_format)
    small = compress_model(full, mask, "conv12", check_input=batch)
    assert next(small.parameters()).is_cuda
    assert small.output_deviation["relative"] < 1e-5  # computed without TF32 (full_fp32_convolutions)
    with torch.no_grad(), full_fp32_convolutions():
        on_gpu = small.to(memory_format=memory_format)(batch).cpu()
        on_cpu = compress_model(full.cpu().to(memory_format=torch.contiguous_format), mask, "conv12")(batch.cpu())
    assert numerics.relative_deviation(on_cpu, on_gpu) < 1e-4


@pytest.mark.slow
def test_search_and_retrain_run_on_a_gpu_with_amp_and_channels_last_and_resume_on_the_cpu(registry, tmp_path):
    gpu = ["--device", "cuda", "--gpu", "0", "--amp", "--channels-last"]
    run_script("main_search_conv12.py", *TINY, *gpu, "-a", "resnet18", "--lr", "1", "--no-adaptive_lr",
               "--normalization", "none", "--weight_decay", "1", "--group", "channel",
               "--path_to_save", str(tmp_path), "--register", "on_gpu", "--registry", str(registry))
    search = only_folder(tmp_path, "conv12_*")
    log = (search / "_log.txt").read_text()
    assert re.search(r"all: (\d+)/(\d+) zero filters", log)
    saved = load_checkpoint(search / "checkpoint.pth.tar")  # loads onto the CPU
    assert all(not value.is_cuda for value in saved["state_dict"].values())
    # The GPU's checkpoint resumes on the CPU and trains one more epoch there.
    run_script("main_search_conv12.py", "--resume", str(search), "--epochs", "2", "--device", "cpu")
    assert load_checkpoint(search / "checkpoint.pth.tar")["epoch"] == 2
    retrain = run_script("main_reduce_retrain_conv12.py", *TINY, *gpu, "--baseline_model", "on_gpu",
                         "--registry", str(registry), "--path_to_save", str(tmp_path / "retrain"))
    assert "inherited weights, before retraining: top1" in retrain.stdout
    retrained = load_checkpoint(only_folder(tmp_path / "retrain", "retrain_*") / "checkpoint.pth.tar")
    assert retrained["epoch"] == 1
