"""Knowledge distillation for the retrain (``--distill``): the unpruned model teaches the
compressed one.

    loss = (1 - A) * CE(student, labels) + A * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with ``--label-smoothing`` in the CE term, A = ``--distill-weight`` and T =
``--distill-temperature`` (Hinton et al., 2015; the T^2 keeps the soft term's gradients
on the scale of the hard term's whatever T is). The default A = 0.5 weighs the two terms
equally: the teacher's soft targets carry what it learnt about similar classes, while the
labels still correct the student where the teacher is wrong (about a quarter of ImageNet's
validation images for a ResNet-50).

The engine's step loop stays the one every workflow uses: it calls ``criterion(output,
target)`` under its autocast. :class:`DistillationLoss` sees the batch's images through a
forward pre-hook on the trained model (:meth:`DistillationLoss.watch`) and runs the teacher on
them itself, so the teacher computes under the same autocast, on the same device and in the
same memory format as the student. The teacher stays in eval mode without gradients; it is
not DDP-wrapped, not in the optimizer and not in the checkpoint. Validation keeps plain
cross-entropy (``Run.val_criterion``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .checkpoint import load_state_dict_file
from .errors import UserError
from .experiment import RUN_INFO, read_run_info
from .models import TORCHVISION, build_model, load_pretrained, torchvision_cache_file
from .registry import registry_file, resolve

log = logging.getLogger("gsparsity")
TEACHER_FROM_SEARCH = "search"  # --distill without PATH: the weights the search started from
DISTILL_TEMPERATURE = 4.0
DISTILL_WEIGHT = 0.5


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
                      temperature: float, weight: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """(1 - weight) * CE + weight * T^2 * KL(teacher || student), the KL averaged over the batch."""
    hard = F.cross_entropy(student, target, label_smoothing=label_smoothing)
    soft = F.kl_div(F.log_softmax(student.float() / temperature, dim=1),
                    F.log_softmax(teacher.float() / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    return (1 - weight) * hard + weight * temperature ** 2 * soft


class DistillationLoss(nn.Module):
    """The training criterion with a teacher: call :meth:`watch` on the trained model once."""

    def __init__(self, teacher: nn.Module, temperature: float, weight: float, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.weight, self.label_smoothing = temperature, weight, label_smoothing
        self._images: torch.Tensor | None = None

    def train(self, mode: bool = True) -> "DistillationLoss":
        super().train(mode)
        self.teacher.eval()  # its BatchNorm statistics never move
        return self

    def watch(self, model: nn.Module) -> RemovableHandle:
        """Keep the input of ``model``'s every training-mode forward pass for the next loss."""
        def keep_images(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if module.training:
                self._images = inputs[0]
        return model.register_forward_pre_hook(keep_images)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        images, self._images = self._images, None  # each batch's images serve one loss
        if images is None:
            raise RuntimeError("DistillationLoss: no training batch seen; call watch(model) on the trained model")
        with torch.no_grad():
            teacher_output = self.teacher(images)
        return distillation_loss(output, teacher_output, target, self.temperature, self.weight,
                                 self.label_smoothing)


def teacher_file(distill: str | None, resumed: dict[str, Any] | None, baseline_model: str,
                 registry: str | None) -> Path | None:
    """The file of the teacher's weights (``--distill [PATH]``), or None without the flag. Checked
    to exist before the experiment folder is made. A resumed run takes the file its run_info.json
    recorded; ``--distill`` alone, the weights the search behind ``baseline_model`` started from."""
    if distill is None:
        return None
    if resumed is not None:
        if not isinstance(resumed.get("distill"), dict) or "teacher" not in resumed["distill"]:
            raise UserError(f"--resume: the run distils (--distill) but its {RUN_INFO} records no teacher")
        path = Path(resumed["distill"]["teacher"])
        if not path.is_file():
            raise UserError(f"--resume: the teacher this run distils from, {path}, is gone; put it back")
        return path
    if distill != TEACHER_FROM_SEARCH:
        path = Path(distill)
        if not path.is_file():
            raise UserError(f"--distill {distill}: no such file")
        return path.resolve()
    return searchs_starting_weights(baseline_model, registry)


def searchs_starting_weights(baseline_model: str, registry: str | None, flag: str = "--distill",
                             ask: str = "name the unpruned model with --distill PATH") -> Path:
    """The file of the --pretrained weights that the search behind ``baseline_model`` (a name in
    the registry ``registry``, None: the default one) started from. ``flag`` and ``ask``: who
    needs them, and what the user can do instead, for the errors."""
    entry = resolve(baseline_model, registry_file(registry))
    if not (entry.experiment_dir / RUN_INFO).is_file():
        raise UserError(f"{flag}: the search behind {baseline_model} left no {RUN_INFO} in "
                        f"{entry.experiment_dir}, so its starting weights are unknown; {ask}")
    pretrained = read_run_info(entry.experiment_dir)["args"].get("pretrained")
    if isinstance(pretrained, bool):  # a search of the original: True was torchvision's weights
        pretrained = TORCHVISION if pretrained else None
    if pretrained is None:
        raise UserError(f"{flag}: the search behind {baseline_model} started without "
                        f"--pretrained weights, so there is no unpruned model to start from; {ask}")
    path = torchvision_cache_file(entry.arch) if pretrained == TORCHVISION else Path(pretrained)
    if not path.is_file():
        raise UserError(f"{flag}: the search behind {baseline_model} started from "
                        f"--pretrained {pretrained}, but {path} is not there; {ask}")
    return path.resolve()


def load_teacher(path: Path, arch: str, num_classes: int, device: torch.device, channels_last: bool) -> nn.Module:
    """The unpruned ``arch`` with the weights in ``path``, in eval mode, on ``device``.
    Refused unless its classifier is trained for the data's classes."""
    classifier = load_state_dict_file(path).get("fc.weight")
    if classifier is not None and classifier.shape[0] != num_classes:
        raise UserError(f"--distill: the teacher {path} classifies {classifier.shape[0]} classes, the data "
                        f"has {num_classes}; name a model trained on this data with --distill PATH")
    teacher = build_model(arch, num_classes)
    try:
        load_pretrained(teacher, str(path), arch)
    except UserError as error:
        raise UserError(f"--distill: {error}") from None
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)


def distill_record(path: Path, arch: str, temperature: float, weight: float) -> dict[str, Any]:
    """What run_info.json keeps, so that --resume distils from the same teacher."""
    return {"teacher": str(path), "arch": arch, "temperature": temperature, "weight": weight}
