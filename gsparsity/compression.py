"""Compression: the small dense model that keeps a mask's filters, with the surviving
weights, and the file that holds it.

``transfer_model_parameters`` copies the surviving weights into the small model
(``pruned_resnet.build_pruned_resnet``) through a *channel plan*: pruning filter
``f`` of a conv removes output channel ``f`` of the conv, channel ``f`` of its
BatchNorm and input channel ``f`` of its consumer conv (Torch-Pruning's coupled
group). It then folds what pruned channels still emit in eval mode:

* ProxSGD with group="channel" zeroes the filter *and* its BN weight and bias, so a
  pruned channel outputs exactly 0 and removing it changes nothing.
* With group="filter" only the conv filter is zero; its BN still emits the constant
  ``c_f = bias_f - running_mean_f * weight_f / sqrt(running_var_f + eps)``.
  If a conv consumes it (after the block's ReLU, so ``a_f = relu(c_f)``), the
  missing contribution ``b_o = sum_f a_f * sum_{kh,kw} W[o, f, kh, kw]`` is folded
  into the consumer's BN running mean (``BN(y + b)`` with mean ``m`` equals
  ``BN(y)`` with mean ``m - b``). This is exact for a 1x1 consumer; for a 3x3
  consumer with zero padding it is exact away from the image border only, where
  the padded taps see zeros instead of ``a_f``. If the residual add consumes it
  (``all_conv``, last conv of the branch, no ReLU before the add), ``c_f`` goes
  into the compressed block's ``residual_bias`` buffer at channel ``f``.

A dropped branch still adds a constant to the residual in eval mode: after the last
conv that keeps nothing, its BatchNorm emits ``c_f`` on every channel (0 with
group="channel"), and the rest of the branch maps constants to constants
(``dropped_branch_output``). That constant is the ``ShortcutOnlyBlock``'s
``residual_bias``. It is exact where the rest of the branch has only 1x1 convs
(conv2 or conv3 of a Bottleneck emptied) and with group="channel" (the constant
reaching the next conv is 0, which zero padding does not change); where a nonzero
constant feeds a 3x3 conv (conv1 of a Bottleneck or a BasicBlock emptied, with
group="filter") it is exact away from the image border only, as above, and
``compress_model(..., check_input=...)`` logs the deviation.

A compressed model's file (a search's ``small_model_<scope>_<t>.pth.tar``, a retrain's
checkpoint) carries ``compressed_model_fields``: ``arch``, ``scope``, ``num_classes`` and the
``mask`` record, beside its ``state_dict``. :func:`load_compressed_model` rebuilds the model from
them alone, and reads the original's files too (``original_files``).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .checkpoint import BEST, CHECKPOINT, atomic_save, load_checkpoint
from .complexity import evaluation_mode
from .errors import UserError
from .experiment import RUN_INFO
from .masks import (Mask, check_mask, dropped_blocks, mask_from_record, mask_to_record, plain_model, pruned_indices,
                    reference_model, save_mask)
from .original_files import (is_original_retrain_checkpoint, is_original_small_model, load_original_retrain_checkpoint,
                             load_original_small_model, original_search_small_model)
from .pruned_resnet import ARCHS, ChannelPlan, build_pruned_resnet, channel_plan
from .registry import SMALL_MODEL_PATTERN, mask_file, searched_small_model, small_model_file
from .structure import RESIDUAL, PrunableConv, branch_chain, prunable_convs

REQUIRED_KEYS = ("arch", "scope", "num_classes", "mask", "state_dict")
logger = logging.getLogger("gsparsity")


# ------------------------------------------------------------ weight transfer


def _sliced(tensor: torch.Tensor, outputs: torch.Tensor | None, inputs: torch.Tensor | None) -> torch.Tensor:
    """Dim 0 is the output channel of a weight/bias/BN statistic, dim 1 the input channel of a weight."""
    if outputs is not None and tensor.dim() >= 1:
        tensor = tensor.index_select(0, outputs.to(tensor.device))
    if inputs is not None and tensor.dim() >= 2:
        tensor = tensor.index_select(1, inputs.to(tensor.device))
    return tensor


def transfer_model_parameters(
    big_model: nn.Module, small_model: nn.Module, mask: Mask, scope: str = "conv12"
) -> None:
    """Copy the surviving weights of ``big_model`` into ``small_model`` in place, then fold constants.

    Prunable convs, their BNs and their consumers are sliced by ``channel_plan``;
    every other parameter and buffer (stem, downsample, fc...) is copied unchanged,
    except those of dropped branches, which have no place in the small model;
    ``residual_bias`` buffers of the small model are reset, then receive the folded
    constants (see the module docstring).
    """
    big, small = plain_model(big_model), plain_model(small_model)
    check_mask(mask, big, scope)
    plan = channel_plan(big, mask, scope)
    dropped = dropped_blocks(big, mask, scope)
    big_state, small_state = big.state_dict(), small.state_dict()
    extra = [key for key in big_state if key not in small_state and not _in_dropped_branch(key, dropped)]
    if extra:
        raise UserError(f"the compressed model has no {extra[0]}: was it built for another architecture "
                        f"or from another mask?")
    with torch.no_grad():
        for key, target in small_state.items():
            if key not in big_state:
                if not key.endswith("residual_bias"):
                    raise UserError(f"the full model has no {key}: was it built for another architecture?")
                target.zero_()
                continue
            module_name = key.rpartition(".")[0]
            source = _sliced(big_state[key], *plan.get(module_name, (None, None)))
            if source.shape != target.shape:
                raise UserError(
                    f"{key}: the mask gives shape {tuple(source.shape)}, the compressed model has "
                    f"{tuple(target.shape)}: was it built from another mask?"
                )
            target.copy_(source)
        _fold_pruned_constants(big, small, mask, scope, plan, dropped)
        _fold_dropped_branches(big, small, mask, dropped)


def _in_dropped_branch(key: str, dropped: set[str]) -> bool:
    """Whether a state_dict key belongs to the branch of a dropped block (its shortcut stays)."""
    return any(key.startswith(f"{block}.") and not key.startswith(f"{block}.downsample.") for block in dropped)


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """The per-channel factor of an eval-mode BatchNorm."""
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


def _bn_output_at_zero(bn: nn.BatchNorm2d) -> torch.Tensor:
    """What an eval-mode BatchNorm emits for an input of 0, per channel."""
    return bn.bias - bn.running_mean * _bn_scale(bn)


def _conv_output_of_constant(conv: nn.Conv2d, value: torch.Tensor) -> torch.Tensor:
    """What ``conv`` emits, per output channel, for an input holding ``value[c]`` on every
    pixel of channel c: away from the border, every tap sees the value."""
    tap_sums = conv.weight.sum(dim=(2, 3))  # (out, inputs per group)
    # Output channel o reads the inputs of its own group only.
    inputs = value.view(conv.groups, -1).repeat_interleave(conv.out_channels // conv.groups, dim=0)
    output = (tap_sums * inputs).sum(dim=1)
    return output if conv.bias is None else output + conv.bias


def dropped_branch_output(block: nn.Module, block_name: str, mask: Mask) -> torch.Tensor:
    """The constant, per channel, that the eval-mode branch of a dropped block adds to its
    residual (module docstring; exact away from the border).

    The last conv of the branch that keeps no filter outputs 0 whatever its input, so its
    BatchNorm emits a constant; each later conv and BatchNorm of the branch (a ReLU
    between them) maps constants to constants.
    """
    chain = branch_chain(block)
    emptied = [position for position, (conv_name, _) in enumerate(chain)
               if f"{block_name}.{conv_name}" in mask and not bool(mask[f"{block_name}.{conv_name}"].any())]
    value = _bn_output_at_zero(getattr(block, chain[emptied[-1]][1]))
    for conv_name, bn_name in chain[emptied[-1] + 1:]:
        bn = getattr(block, bn_name)
        value = _conv_output_of_constant(getattr(block, conv_name), value.clamp(min=0))  # ReLU before the conv
        value = value * _bn_scale(bn) + _bn_output_at_zero(bn)
    return value


def _fold_dropped_branches(big: nn.Module, small: nn.Module, mask: Mask, dropped: set[str]) -> None:
    """Each dropped branch's constant becomes its ShortcutOnlyBlock's ``residual_bias``."""
    for block_name in dropped:
        residual_bias = small.get_submodule(block_name).residual_bias
        residual_bias.copy_(dropped_branch_output(big.get_submodule(block_name), block_name, mask))


def _fold_pruned_constants(
    big: nn.Module, small: nn.Module, mask: Mask, scope: str, plan: ChannelPlan, dropped: set[str]
) -> None:
    """Move the eval-mode constants of pruned channels into what consumes them (module docstring);
    the ``dropped`` blocks' branches are left to ``_fold_dropped_branches``."""
    bn_name_of = {prunable.name: prunable.bn_name for prunable in prunable_convs(big, "all_conv")}
    for prunable in prunable_convs(big, scope):
        if prunable.block_name in dropped:
            continue
        pruned = pruned_indices(mask[prunable.name]).to(prunable.bn.weight.device)
        if pruned.numel() == 0 or prunable.consumer == prunable.tied_with:
            # Nothing pruned, or only feeding the grouped conv's groups that are pruned too.
            continue
        constants = _bn_output_at_zero(prunable.bn)[pruned]
        if prunable.consumer == RESIDUAL:
            _fold_into_residual(small, prunable, pruned, constants)
        else:
            consumer_bn_name = bn_name_of[prunable.consumer]
            _fold_into_consumer_bn(big, small, prunable, pruned, constants, consumer_bn_name, plan)


def _fold_into_residual(
    small: nn.Module, prunable: PrunableConv, pruned: torch.Tensor, constants: torch.Tensor
) -> None:
    residual_bias = small.get_submodule(prunable.block_name).residual_bias
    residual_bias[pruned.to(residual_bias.device)] += constants.to(residual_bias)


def _fold_into_consumer_bn(
    big: nn.Module,
    small: nn.Module,
    prunable: PrunableConv,
    pruned: torch.Tensor,
    constants: torch.Tensor,
    consumer_bn_name: str,
    plan: ChannelPlan,
) -> None:
    activations = constants.clamp(min=0)  # the block's ReLU sits between the BN and its consumer
    consumer_weight = big.get_submodule(prunable.consumer).weight
    tap_sums = consumer_weight.index_select(1, pruned).sum(dim=(2, 3))  # (out, pruned), exact for 1x1
    missing_input = tap_sums @ activations
    kept_outputs = plan.get(prunable.consumer, (None, None))[0]
    running_mean = small.get_submodule(consumer_bn_name).running_mean
    running_mean -= _sliced(missing_input, kept_outputs, None).to(running_mean)


# ------------------------------------------------------------------ compression


def compress_model(
    model: nn.Module,
    mask: Mask,
    scope: str = "conv12",
    check_input: torch.Tensor | None = None,
    arch: str | None = None,
) -> nn.Module:
    """The small dense model that keeps the mask's filters, with the surviving weights.

    ``arch`` is the torchvision name of ``model`` (found by comparing with the
    supported ResNets when omitted). The result lives on the model's device, in its
    train/eval mode. With ``check_input``, both models run it in eval mode and the
    largest output deviation is logged and stored as ``output_deviation``.
    """
    big = plain_model(model)
    arch = arch or infer_arch(big)
    reference_parameter = next(big.parameters())
    small = build_pruned_resnet(arch, mask, scope, num_classes=big.fc.out_features)
    small = small.to(device=reference_parameter.device, dtype=reference_parameter.dtype)
    transfer_model_parameters(big, small, mask, scope)
    small.train(big.training)
    if check_input is not None:
        small.output_deviation = output_deviation(big, small, check_input)
        logger.info(
            "compressed model output deviation on the check input: max abs %.3g, relative %.3g",
            small.output_deviation["max_abs"],
            small.output_deviation["relative"],
        )
    return small


def output_deviation(full_model: nn.Module, small_model: nn.Module, batch: torch.Tensor) -> dict[str, float]:
    """Largest |full - small| eval-mode output difference, absolute and relative to max |full|,
    computed in full fp32 precision."""
    with torch.no_grad(), evaluation_mode(full_model), evaluation_mode(small_model), full_fp32_convolutions():
        full_output = full_model(batch.to(next(full_model.parameters()).device))
        small_output = small_model(batch.to(next(small_model.parameters()).device)).to(full_output.device)
    max_abs = (full_output - small_output).abs().max().item()
    scale = full_output.abs().max().item()
    return {"max_abs": max_abs, "relative": max_abs / scale if scale > 0 else max_abs}


@contextlib.contextmanager
def full_fp32_convolutions() -> Iterator[None]:
    """cuDNN convolutions in full fp32 precision, then the setting as it was. From Ampere on
    they default to TF32, whose rounding (about 1e-3 relative) would swamp the deviation
    that compression itself causes (1e-5 or less where it is exact)."""
    try:  # torch >= 2.9; mixing in the old flag is an error there
        owner, name, full = torch.backends.cudnn.conv, "fp32_precision", "ieee"
        previous = getattr(owner, name)
    except (AttributeError, RuntimeError):
        owner, name, full = torch.backends.cudnn, "allow_tf32", False
        previous = getattr(owner, name)
    setattr(owner, name, full)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def infer_arch(model: nn.Module) -> str:
    """The supported torchvision ResNet whose weights have the shapes of ``model``'s (classifier aside)."""
    shapes = _weight_shapes(plain_model(model))
    for arch in ARCHS:
        if _reference_weight_shapes(arch) == shapes:
            return arch
    raise UserError("cannot tell which torchvision ResNet this model is: pass arch=... explicitly")


def _weight_shapes(model: nn.Module) -> tuple:
    return tuple(
        (key, tuple(tensor.shape)) for key, tensor in model.state_dict().items() if not key.startswith("fc.")
    )


@functools.lru_cache(maxsize=None)
def _reference_weight_shapes(arch: str) -> tuple:
    return _weight_shapes(reference_model(arch))


# ------------------------------------------------------------ the compressed model's file


def compressed_model_fields(arch: str, scope: str, num_classes: int, mask_record: dict) -> dict[str, Any]:
    """What a checkpoint needs, beside its ``state_dict``, for :func:`load_compressed_model` to
    rebuild the model: the search's small-model file and every retrain checkpoint carry it."""
    return {"arch": arch, "scope": scope, "num_classes": num_classes, "mask": mask_record}


def save_compressed_model(folder: Path, small: nn.Module, mask: Mask, arch: str, scope: str, threshold: float,
                          num_classes: int, epoch: int, **figures: float | None) -> Path:
    """Write what a search leaves for one threshold: ``mask_<scope>_<t>.json`` and the
    ``small_model_<scope>_<t>.pth.tar`` that :func:`load_compressed_model` reads (``figures``:
    accuracies stored beside the weights). Returns the small model's path."""
    save_mask(mask, folder / mask_file(scope, threshold), arch, scope, threshold)
    path = folder / small_model_file(scope, threshold)
    record = mask_to_record(mask, arch, scope, threshold)
    atomic_save({"epoch": epoch, **compressed_model_fields(arch, scope, num_classes, record),
                 "state_dict": small.state_dict(), **figures}, path)
    return path


def compressed_model_file(path: str | os.PathLike) -> Path:
    """The checkpoint holding a compressed model: ``path`` itself if it is a file, else the
    ``small_model_*.pth.tar`` of a search folder (its own threshold's) or the best (else latest) checkpoint
    of a retrain folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_file():
        return path
    small_models = [file for file in path.iterdir() if SMALL_MODEL_PATTERN.fullmatch(file.name)]
    if small_models:
        # As the registry does: the search's own threshold (others are saved beside it).
        return searched_small_model(path, small_models)
    if (path / RUN_INFO).is_file():
        for name in (BEST, CHECKPOINT):  # model_best is missing while top-1 stayed 0
            if (path / name).is_file():
                return path / name
    raise UserError(f"{path}: neither a search folder (no small_model_*.pth.tar) nor a retrain "
                    f"folder (no run_info.json with {BEST} or {CHECKPOINT})")


def load_compressed_model(path: str | os.PathLike,
                          registry: str | os.PathLike | None = None) -> tuple[nn.Module, dict]:
    """(the compressed model in eval mode on the CPU, info) from a small-model file, a retrain
    checkpoint, or an experiment folder holding one (``compressed_model_file``).

    ``info`` holds ``path`` (the file read), ``arch``, ``scope``, ``num_classes``,
    ``epoch`` (None if unknown) and ``mask`` (the ``mask_to_record`` record).
    The model is rebuilt from the mask inside the file: no registry is needed, but for a
    retrain checkpoint of the original, which has no mask (``registry``: None, the default one).
    """
    path = original_search_small_model(path) or compressed_model_file(path)
    saved = load_checkpoint(path)
    if is_original_small_model(saved):
        return load_original_small_model(path, saved)
    if is_original_retrain_checkpoint(saved, path):
        return load_original_retrain_checkpoint(path, saved, registry)
    missing = [key for key in REQUIRED_KEYS if key not in saved]
    if missing:
        raise UserError(f"{path} is not a compressed model: it has no {', '.join(missing)} "
                        f"(a search's small_model_*.pth.tar or a retrain's checkpoint is)")
    if type(saved["num_classes"]) is not int or saved["num_classes"] < 1:
        raise UserError(f"{path}: num_classes must be a positive integer, not {saved['num_classes']!r}")
    mask = mask_from_record(saved["mask"], arch=saved["arch"], scope=saved["scope"], source=str(path))
    model = build_pruned_resnet(saved["arch"], mask, saved["scope"], saved["num_classes"])
    try:
        model.load_state_dict(saved["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as error:
        raise UserError(f"{path}: its weights do not fit the model built from its mask "
                        f"({str(error).strip().splitlines()[0]}){_older_layout_hint(saved, mask)}") from None
    info = {"path": path, "epoch": saved.get("epoch"),
            **{key: saved[key] for key in ("arch", "scope", "num_classes", "mask")}}
    return model.eval(), info


def _older_layout_hint(saved: dict, mask: dict) -> str:
    """Why an older file does not load: it kept one zero channel where a layer kept no filter,
    where a compressed model now drops that block's branch (masks.dropped_blocks)."""
    state_dict = saved["state_dict"] if isinstance(saved.get("state_dict"), dict) else {}
    emptied = [name for name, row in mask.items() if not bool(row.any()) and f"{name}.weight" in state_dict]
    if not emptied:
        return ""
    return (f"; it was saved when a layer that keeps no filter ({emptied[0]}) still had one channel, "
            f"where its block's branch is now dropped: compress the search's full model again")
