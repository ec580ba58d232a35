"""The training step: mixed precision, no waiting on the device between print steps, and
the share of its time spent waiting for data.

On a GPU, a step that reads a value back (``.item()``, ``.tolist()``, ``bool(tensor)``) or
copies a tensor made from Python data to the device waits until the GPU has caught up,
and the GPU then idles while Python prepares the next step. This machine has no GPU, so
the tests count those operations on the CPU, where the same code runs them.
"""
from __future__ import annotations

import re
import time

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models import resnet18

from gsparsity import engine
from gsparsity.engine import LoopSettings
from gsparsity.distributed import DistContext
from gsparsity.stopping import StepGuard
from proxsgd import ProxSGD, group_model_parameters

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
FAKE_GPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
# What reads a value back from the device, and what makes a tensor from Python data.
HOST_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default}


class HostTraffic(TorchDispatchMode):
    """Counts the ops of HOST_OPS, and ``Tensor.tolist`` calls (which bypass dispatch)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.count = 0
        original_tolist = torch.Tensor.tolist

        def counted_tolist(tensor: torch.Tensor):
            self.count += 1
            return original_tolist(tensor)

        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def host_traffic_of_an_epoch(steps: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """Host reads and host-made tensors in one search epoch of ``steps`` steps, printing
    and checking only at its end (as on a GPU with --print-freq larger than the epoch)."""
    torch.manual_seed(0)
    model = resnet18(num_classes=3)
    optimizer = ProxSGD(group_model_parameters(model, mu=0.01), lr=0.1, adaptive_lr=True,
                        normalization="div")
    batches = [(torch.randn(2, 3, 16, 16), torch.tensor([0, 2])) for _ in range(steps)]
    args = LoopSettings(print_freq=1000)
    guard = StepGuard(CPU, check_every=1000)
    with monkeypatch.context() as patch, HostTraffic(patch) as traffic:
        engine.train_one_epoch(model, batches, nn.CrossEntropyLoss(), optimizer, None, CPU, 0, args,
                               guard=guard)
    return traffic.count


@pytest.mark.slow
def test_a_training_step_never_waits_on_the_device(monkeypatch):
    # The epoch's end reads its figures back once; the steps add nothing to that.
    assert host_traffic_of_an_epoch(2, monkeypatch) == host_traffic_of_an_epoch(5, monkeypatch)


@pytest.mark.slow
def test_the_host_traffic_count_sees_a_per_step_read(monkeypatch):
    """The counter itself: an .item() in the step shows up once per step."""
    original = engine.MetricSums.add

    def add_and_read(self, loss, output, target):
        loss.item()
        original(self, loss, output, target)

    monkeypatch.setattr(engine.MetricSums, "add", add_and_read)
    assert host_traffic_of_an_epoch(5, monkeypatch) - host_traffic_of_an_epoch(2, monkeypatch) == 3


def test_amp_computes_in_bf16_on_cpu(monkeypatch):
    assert engine.amp_dtype(torch.device("cpu")) == torch.bfloat16


def pretend_gpu_generation(monkeypatch: pytest.MonkeyPatch, has_bf16: bool) -> None:
    """A GPU's compute capability: 8.0 (A100) has bf16, 7.0 (V100) does not."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0) if has_bf16 else (7, 0))


@pytest.mark.parametrize("gpu_has_bf16, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_on_a_gpu_computes_in_bf16_where_it_has_it_else_fp16(monkeypatch, gpu_has_bf16, dtype):
    pretend_gpu_generation(monkeypatch, gpu_has_bf16)
    assert engine.amp_dtype(torch.device("cuda", 0)) == dtype


@pytest.mark.filterwarnings("ignore:.*CUDA is not available")  # the scaler made for FAKE_GPU says so
@pytest.mark.parametrize("gpu_has_bf16", [True, False])
def test_a_grad_scaler_is_made_only_for_fp16(monkeypatch, gpu_has_bf16):
    """Loss scaling is for fp16's narrow range; bf16 runs go without the scaler's sync."""
    pretend_gpu_generation(monkeypatch, gpu_has_bf16)
    assert engine.make_scaler(True, CPU.device) is None
    assert engine.make_scaler(False, FAKE_GPU.device) is None
    assert isinstance(engine.make_scaler(True, FAKE_GPU.device), torch.amp.GradScaler) == (not gpu_has_bf16)


class SlowLoader:
    """Batches that each take ``seconds`` to arrive, as from a loader that cannot keep up."""

    def __init__(self, batches: list, seconds: float) -> None:
        self.batches, self.seconds = batches, seconds

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            time.sleep(self.seconds)
            yield batch


def data_share_of_an_epoch(loader, captured_log) -> tuple[int, engine.EpochMetrics]:
    """The "data N%" that the progress line printed at the epoch's last step, and the
    epoch's figures."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 3, 8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = LoopSettings(print_freq=2)
    metrics = engine.train_one_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, None, CPU, 0, args)
    progress = [line for line in captured_log.lines if line.startswith("epoch 0 [4/4]")]
    share = re.search(r" data (\d+)% ", progress[-1])
    return int(share.group(1)), metrics


@pytest.mark.slow
def test_the_progress_line_says_what_share_of_the_time_went_to_waiting_for_data(captured_log):
    batches = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 2])) for _ in range(4)]
    slow_share, slow = data_share_of_an_epoch(SlowLoader(batches, 0.25), captured_log)
    fast_share, fast = data_share_of_an_epoch(batches, captured_log)
    # four waits of 0.25 s against steps of a few ms
    assert slow.data_seconds >= 1.0 and slow_share >= 60
    assert fast.data_seconds < 0.1 and fast_share <= 10


def one_step(clip_grad_norm: float, inputs: torch.Tensor, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """How far one SGD step (lr 1, no momentum) moves a linear model's weights on ``inputs``."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    before = torch.cat([parameter.detach().flatten().clone() for parameter in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = nn.CrossEntropyLoss()(model(inputs), torch.tensor([0, 1]))
    engine.backward_and_step(loss, optimizer, scaler, clip_grad_norm=clip_grad_norm)
    return torch.cat([parameter.detach().flatten() for parameter in model.parameters()]) - before


def test_clipping_caps_the_step_an_outlier_batch_takes_and_leaves_ordinary_steps_alone():
    outlier = torch.tensor([[300.0, -200.0, 100.0, 50.0], [-250.0, 400.0, 0.0, -80.0]])
    unclipped = one_step(0.0, outlier)
    assert unclipped.norm() > 50  # the case the flag is for: one batch throws the weights far
    assert one_step(2.0, outlier).norm() == pytest.approx(2.0, rel=1e-5)
    assert torch.allclose(one_step(2.0, outlier), unclipped * (2.0 / unclipped.norm()), atol=1e-6)  # same direction
    ordinary = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    assert one_step(0.0, ordinary).norm() < 2.0
    assert torch.equal(one_step(2.0, ordinary), one_step(0.0, ordinary))


def test_clipping_with_a_grad_scaler_clips_the_true_gradients_not_the_loss_scaled_ones():
    outlier = torch.tensor([[300.0, -200.0, 100.0, 50.0], [-250.0, 400.0, 0.0, -80.0]])
    scaled = one_step(2.0, outlier, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    assert torch.allclose(scaled, one_step(2.0, outlier), atol=1e-6)


def test_an_epoch_with_clip_grad_norm_set_moves_each_step_at_most_lr_times_the_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = [(torch.randn(2, 3, 2, 2) * 100, torch.tensor([0, 2])) for _ in range(3)]
    before = torch.cat([parameter.detach().flatten().clone() for parameter in model.parameters()])
    engine.train_one_epoch(model, batches, nn.CrossEntropyLoss(), optimizer, None, CPU, 0,
                           LoopSettings(print_freq=1000, clip_grad_norm=0.1))
    after = torch.cat([parameter.detach().flatten() for parameter in model.parameters()])
    assert 0.05 < (after - before).norm() <= 3 * 0.5 * 0.1 + 1e-6
