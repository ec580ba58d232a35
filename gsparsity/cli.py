"""Command-line flags of the top-level scripts.

Names and defaults follow pytorch/examples' ImageNet script and the original
GSparsity scripts, so their users feel at home. ``build_parser(kind)`` gives the
parser of one workflow: ``"search"``, ``"retrain"`` or ``"original"``.
"""
from __future__ import annotations

import argparse
import math
from typing import Sequence

from .budget import parse_target
from .distill import DISTILL_TEMPERATURE, DISTILL_WEIGHT, TEACHER_FROM_SEARCH
from .errors import UserError
from .models import TORCHVISION
from .pruned_resnet import ARCHS
from .registry import check_model_name


# Defaults that differ between workflows: (lr, weight decay or the search's mu, epochs).
WORKFLOW_DEFAULTS = {
    "search": (1e-3, 0.05, 90),
    "retrain": (0.1, 1e-4, 90),
    "original": (0.1, 1e-4, 90),
}

DESCRIPTIONS = {
    "search": "Search: train with ProxSGD so that whole filters become zero, then compress.",
    "retrain": "Retrain a compressed model registered in list_of_models.py.",
    "original": "Train or evaluate the unpruned model.",
}


def build_parser(kind: str) -> argparse.ArgumentParser:
    lr, weight_decay, epochs = WORKFLOW_DEFAULTS[kind]
    parser = argparse.ArgumentParser(description=DESCRIPTIONS[kind])
    add = parser.add_argument
    add("--data", metavar="DIR", default=None,
        help="ImageFolder root holding train/ and val/, or 'demo' for the handwritten digits "
             "that ship with scikit-learn")
    add("-a", "--arch", default="resnet50", choices=ARCHS)
    add("-j", "--workers", default=4, type=int, metavar="N", help="data loading workers per process")
    add("--epochs", default=epochs, type=int, metavar="N")
    add("--start-epoch", default=0, type=int, metavar="N", help="manual epoch number (useful on restarts)")
    add("-b", "--batch-size", "--batch_size", default=256, type=int, metavar="N",
        help="global batch size, split across all processes")
    add("--lr", "--learning-rate", default=lr, type=float, dest="lr")
    add("--momentum", default=0.9, type=float)
    if kind == "search":  # the original's search spells the group-lasso gain --weight_decay
        add("--mu", "--weight_decay", "--wd", "--weight-decay", default=weight_decay, type=float, dest="mu",
            help="group-lasso gain mu (with --layer_adaptive: doubled in layer2 and layer3)")
    else:
        add("--weight_decay", "--wd", "--weight-decay", default=weight_decay, type=float,
            dest="weight_decay", help="L2 weight decay")
    add("--lr-scheduler", default="step", choices=("step", "cosine"),
        help="step: x0.1 every --lr-step epochs; cosine: to zero over --epochs")
    add("--lr-step", default=30, type=int, metavar="N")
    add("--warmup-epochs", default=0, type=int, metavar="N",
        help="first N epochs: lr rises linearly, lr/N in the first to lr in the Nth; then "
             "--lr-scheduler over the remaining epochs")
    add("-p", "--print-freq", default=10, type=int, metavar="N")
    add("--resume", default=None, metavar="DIR", help="experiment folder to continue")
    add("-e", "--evaluate", action="store_true", help="evaluate on the validation set and stop")
    # The original's search always starts from ImageNet weights (store_true, default True):
    # a search from random weights is not GSparsity, so it takes --no-pretrained to ask for one.
    add("--pretrained", nargs="?", const=TORCHVISION, default=TORCHVISION if kind == "search" else None,
        metavar="PATH",
        help="start from weights: torchvision's IMAGENET1K_V1 from the local torch cache, "
             "or PATH to a state_dict or one of our checkpoints"
             + (" (default: torchvision's)" if kind == "search" else ""))
    if kind == "search":
        add("--no-pretrained", dest="pretrained", action="store_const", const=None,
            help="start the search from random weights instead")
    add("--seed", default=None, type=int, help="makes CPU runs repeatable")
    add("--dist-url", default="env://", help="process-group init method")
    add("--dist-backend", default="auto", choices=("auto", "nccl", "gloo"),
        help="auto: nccl on CUDA, gloo on CPU")
    add("--world-size", default=-1, type=int,
        help="number of nodes when spawning one process per GPU yourself (torchrun sets it)")
    add("--rank", default=-1, type=int, help="node rank when spawning yourself (torchrun sets it)")
    add("--gpu", default=None, type=int, help="use this one GPU only, no spawning")
    add("--dist-timeout", default=30, type=float, metavar="MIN",
        help="minutes a process waits for the others before giving up")
    add("--path_to_save", default="experiments", metavar="DIR", help="where experiment folders go")
    add("--run_id", default=None, help="suffix of the experiment folder name")
    add("--image-size", default=224, type=int, help="train/val crop size (smaller for quick runs)")
    add("--amp", action="store_true",
        help="mixed precision: bf16 (CPU, GPUs from Ampere on), else fp16 with a GradScaler")
    add("--channels-last", action="store_true", help="channels_last memory format")
    add("--compile", action=argparse.BooleanOptionalAction, default=False,
        help="torch.compile the model for training and validation (each new batch shape compiles "
             "once, tens of seconds on CPU; see BENCHMARKS.md for when it pays)")
    add("--dummy", action="store_true", help="synthetic data (FakeData) instead of --data")
    add("--subset", default=None, type=int, metavar="N",
        help="use only N train and N val images, evenly spaced through each set (quick runs and tests)")
    add("--device", default="auto", choices=("auto", "cuda", "cpu"))
    add("--registry", default=None, metavar="FILE",
        help="model registry to use (default: $GSPARSITY_REGISTRY, else list_of_models.py in "
                 "the working folder)")
    add("--checkpoint-every", default=0, type=int, metavar="N",
        help="also save checkpoint.pth.tar every N training steps, not only at epoch end "
             "(--resume then continues from that exact step); 0: epoch end only")
    add("--skip-nonfinite", default=0, type=int, metavar="N",
        help="skip up to N steps whose loss is nan/inf (no update) before stopping; "
             "costs a host sync per step on CUDA")
    add("--clip-grad-norm", default=0.0, type=float, metavar="NORM",
        help="scale each step's gradients down to a total L2 norm of at most NORM, so that one "
             "outlier batch cannot throw a small-data run off; 0 (default): no clipping, as the original")
    add("--bad-images", default="stop", choices=("stop", "skip"),
        help="an unreadable image file: stop, naming it; or skip it (replaced by the next "
             "readable image), with a count per epoch")
    if kind == "search":
        add("--normalization", default="div", choices=("none", "mul", "div"),
            help="scale mu by sqrt(filter size) (mul) or its inverse (div)")
        add("--adaptive_lr", default=True, action=argparse.BooleanOptionalAction,
            help="ProxSGD's per-filter adaptive step (on, as in the paper)")
        add("--layer_adaptive", default=None, action=argparse.BooleanOptionalAction,
            help="2*mu in layer2 and layer3 (default: on for conv12, off for all_conv, as in the "
                 "original's scripts)")
        add("--pruning_threshold", default=1e-6, type=float,
            help="filters with a smaller L2 norm are pruned")
        add("--group", default="filter", choices=("filter", "channel"),
            help="filter: the conv filter alone (the paper's); channel: with its BN weight and "
                 "bias, so that pruning is exact")
        add("--round-to", default=1, type=int, metavar="N",
            help="keep a multiple of N filters in every pruned layer (hardware-friendly widths): "
                 "the highest-norm zero filters are kept too")
        add("--target-macs", default=None, metavar="G",
            help="aim at a MACs budget: GMac per 224x224 image (e.g. 2.05) or a share of the full "
                 "model's (e.g. 50%%); short probes pick mu first (--mu is where they start)")
        add("--budget-steps", default=20, type=int, metavar="N", help="training steps of each probe")
        add("--budget-probes", default=8, type=int, metavar="N", help="most probes the budget search runs")
        add("--budget-tolerance", default=1.0, type=float, metavar="PCT",
            help="stop probing once a probe is this many percentage points of the full MACs "
                 "from the target")
        add("--budget-ranking", default="layer", choices=("global", "layer"),
            help="how the budget mask ranks filters: layer (the share of its starting norm a filter "
                 "kept, over its layer's median) or global (that share alone, which empties whole "
                 "layers first)")
        add("--settle-epochs", default=0, type=int, metavar="N",
            help="with --target-macs: make the budget's mask final N epochs before the end and train "
                 "those epochs without the filters it cuts, so that the search ends with its compressed "
                 "model exact and adapted; 0: cut when the search ends")
        add("--register", default=None, metavar="NAME",
            help="add the result to the model registry under NAME when the search ends")
        add("--bn-calibration-images", default=256, type=int, metavar="N",
            help="at every epoch end, also evaluate the compressed model with its BatchNorm "
                 "statistics re-estimated on N training images (adaptive BN); 0: off")
    if kind in ("retrain", "original"):
        add("--label-smoothing", default=0.0, type=float, metavar="EPS",
            help="label smoothing of the training loss (cross-entropy); validation loss stays plain")
    if kind == "retrain":
        add("--distill", nargs="?", const=TEACHER_FROM_SEARCH, default=None, metavar="PATH",
            help="knowledge distillation from the unpruned model: without PATH, the weights the "
                 "search started from (its --pretrained); PATH: a state_dict or one of our checkpoints")
        add("--distill-temperature", default=DISTILL_TEMPERATURE, type=float, metavar="T",
            help="softmax temperature of the teacher's and the student's outputs in the distillation term")
        add("--distill-weight", default=DISTILL_WEIGHT, type=float, metavar="A",
            help="loss = (1-A) * cross-entropy + A * T^2 * KL(teacher || student), in [0, 1]")
        add("--rescale-filters", action=argparse.BooleanOptionalAction, default=False,
            help="before retraining, scale every branch conv's filters (and its BatchNorm statistics) "
                 "to the norm of a freshly initialised conv: the search's shrinking leaves them tiny, "
                 "which makes SGD's steps on them huge (gsparsity/filter_norms.py)")
        add("--inherit", default="search", choices=("search", "start"),
            help="the compressed model's weights: search, those the search ended with (the "
                 "original's); start, those it started from (its --pretrained), cut to the same mask")
        add("--baseline_model", default=None, metavar="NAME",
            help="name of the compressed model in list_of_models.py")
        add("--pruning_threshold", default=None, type=float, metavar="T",
            help="retrain the search's compressed model at this threshold "
                 "(small_model_<scope>_<T>.pth.tar in its folder; default: the registered one)")
    return parser


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the flags the user typed (used so --resume can let them override)."""
    saved = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]


def validate_args(args: argparse.Namespace, kind: str) -> None:
    """Reject nonsense before any process starts or any file is written."""
    def positive(name: str, value: float) -> None:
        if not (value > 0 and math.isfinite(value)):
            raise UserError(f"--{name} must be > 0, got {value}")

    positive("lr", args.lr)
    positive("epochs", args.epochs)
    positive("batch-size", args.batch_size)
    positive("image-size", args.image_size)
    positive("print-freq", args.print_freq)
    positive("lr-step", args.lr_step)
    positive("dist-timeout", args.dist_timeout)
    flag, decay = ("mu/--weight_decay", args.mu) if kind == "search" else ("weight_decay", args.weight_decay)
    if not (decay >= 0 and math.isfinite(decay)):
        raise UserError(f"--{flag} must be >= 0, got {decay}")
    if not 0 <= args.momentum < 1 + 1e-12:
        raise UserError(f"--momentum must be in [0, 1], got {args.momentum}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.start_epoch < 0:
        raise UserError(f"--start-epoch must be >= 0, got {args.start_epoch}")
    if args.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if args.skip_nonfinite < 0:
        raise UserError(f"--skip-nonfinite must be >= 0, got {args.skip_nonfinite}")
    if not (args.clip_grad_norm >= 0 and math.isfinite(args.clip_grad_norm)):
        raise UserError(f"--clip-grad-norm must be >= 0 (0: off), got {args.clip_grad_norm}")
    if args.subset is not None and args.subset < 1:
        raise UserError(f"--subset must be >= 1, got {args.subset}")
    if args.data is None and not args.dummy:
        raise UserError("say where the images are: --data DIR (or --data demo, or --dummy)")
    if kind == "search":
        positive("pruning_threshold", args.pruning_threshold)
        if args.round_to < 1:
            raise UserError(f"--round-to must be >= 1, got {args.round_to}")
        if args.momentum == 0:
            raise UserError("--momentum must be > 0 for ProxSGD (it weighs the new gradient)")
        if args.register is not None:
            check_model_name(args.register)
        if args.target_macs is not None:
            parse_target(args.target_macs)
        if args.bn_calibration_images < 0:
            raise UserError(f"--bn-calibration-images must be >= 0, got {args.bn_calibration_images}")
        if not 0 <= args.settle_epochs < args.epochs:
            raise UserError(f"--settle-epochs must be >= 0 and less than --epochs ({args.epochs}), "
                            f"got {args.settle_epochs}")
        if args.settle_epochs and args.target_macs is None:
            raise UserError("--settle-epochs trains without the filters a budget cuts: give --target-macs too")
        if args.budget_steps < 2:
            raise UserError(f"--budget-steps must be >= 2, got {args.budget_steps}")
        if args.budget_probes < 1:
            raise UserError(f"--budget-probes must be >= 1, got {args.budget_probes}")
        if not (args.budget_tolerance >= 0 and math.isfinite(args.budget_tolerance)):
            raise UserError(f"--budget-tolerance must be >= 0, got {args.budget_tolerance}")
    if not 0 <= args.warmup_epochs < args.epochs:
        raise UserError(f"--warmup-epochs must be >= 0 and less than --epochs ({args.epochs}), "
                        f"got {args.warmup_epochs}")
    if kind in ("retrain", "original") and not 0 <= args.label_smoothing < 1:
        raise UserError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if kind == "retrain":
        positive("distill-temperature", args.distill_temperature)
        if not 0 <= args.distill_weight <= 1:
            raise UserError(f"--distill-weight must be in [0, 1], got {args.distill_weight}")
        if args.distill is None and (args.distill_temperature, args.distill_weight) != (DISTILL_TEMPERATURE,
                                                                                        DISTILL_WEIGHT):
            raise UserError("--distill-temperature and --distill-weight need --distill [PATH]")
    if kind == "retrain" and args.pruning_threshold is not None:
        positive("pruning_threshold", args.pruning_threshold)
    if kind == "retrain" and args.baseline_model is None and args.resume is None:
        raise UserError("say which compressed model to retrain: --baseline_model NAME "
                        "(a name in list_of_models.py)")
