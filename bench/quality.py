"""Top-1 against MACs: GSparsity beside simple pruning baselines, at equal MACs and training.

    python bench/quality.py [--data demo] [-a resnet50] [--budgets 50% 25%] [--seeds 0 1 2]
        [--methods gsparsity l1 random scratch torch_pruning] [--out DIR]

For every seed, one baseline is trained (``main_original.py``, ``--baseline-epochs``), and
the unpruned model is trained again for as many epochs as the pruned ones get in all
(``unpruned``: baseline + search + retrain epochs), the fair reference for "N points below
the baseline". Then, for every MACs budget (a share of the full model's MACs), each method
gives a compressed model of the baseline at that budget, and every one is retrained with
the same command (``main_reduce_retrain_conv12.py``, ``--retrain-epochs``, ``--retrain-flags``):

- ``gsparsity``: ``main_search_conv12.py --target-macs P%`` from the baseline (``--search-flags``,
  ``--search-epochs``), its compressed model retrained;
- ``l1``: the baseline's filters with the largest L1 norm (Li et al., 2017), the same share
  kept in every prunable layer, that share the largest that meets the budget;
- ``random``: the same widths as ``l1``, filters drawn at random (seeded);
- ``scratch``: GSparsity's compressed architecture, freshly initialised, trained for
  search + retrain epochs (Liu et al., 2019);
- ``torch_pruning``: Torch-Pruning's group-norm sparse training (``GroupNormPruner``) of the
  baseline on the same convs for ``--search-epochs``, then its global group-norm pruning to the
  budget, and the same retrain (needs ``pip install torch-pruning``).

With ``--distill`` every retrain (and ``scratch``'s training) distils from the seed's
baseline (the retrain's ``--distill PATH``); ``--retrain-flags "--label-smoothing 0.1"``
measures label smoothing the same way.

The figure of a run is the top-1 of its LAST epoch (not the best one: no selection on the
validation set). Every finished run is one line with an estimate of the time left, and one
record in ``runs.jsonl``; ``results.json``, ``results.csv`` and ``quality.png`` (top-1 against
MACs, one line per method) follow at the end. A run already in ``runs.jsonl`` with the same
settings is not run again, so an interrupted bench goes on where it stopped.

It is a benchmark, not a test: tests/test_quality_bench.py runs it at toy size only.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]

from gsparsity.checkpoint import load_checkpoint
from gsparsity.complexity import count_macs_params
from gsparsity.compression import compress_model, load_compressed_model, save_compressed_model
from gsparsity.masks import Mask, mask_from_record
from gsparsity.models import build_model
from gsparsity.pruned_resnet import build_pruned_resnet
from gsparsity.registry import register_experiment, saved_small_models, searched_small_model
from gsparsity.report import EPOCH_DONE
from gsparsity.structure import prunable_convs

METHODS = ("gsparsity", "l1", "random", "scratch", "torch_pruning", "gsparsity_rescaled", "gsparsity_mask")
# Ablations: gsparsity_rescaled, the retrain's --rescale-filters; gsparsity_mask, its --inherit
# start (the search's mask on the baseline's weights: its widths without its weights).
DEFAULT_METHODS = METHODS[:5]
REFERENCE = "unpruned"  # the unpruned model trained for as many epochs as the pruned ones
SCOPE = "conv12"
THRESHOLD = 1e-6  # of the masks this bench writes itself (l1, random, scratch, torch_pruning)
# The demo's recipe (demo.sh); --search-flags / --retrain-flags / --baseline-flags replace them.
SEARCH_FLAGS = "--lr 0.05 --no-adaptive_lr --normalization none --weight_decay 1.0 --group channel --pruning_threshold 1e-3"
TRAIN_FLAGS = "--lr 0.02 --lr-scheduler cosine"
# The settings each kind of run depends on (its key in runs.jsonl).
_DATA = ("data", "arch", "image_size", "batch_size", "subset")
_BASELINE = _DATA + ("baseline_epochs", "baseline_flags")
_RETRAIN = _BASELINE + ("retrain_epochs", "retrain_flags", "distill")
SETTINGS_OF = {
    "baseline": _BASELINE,
    "unpruned": _BASELINE + ("search_epochs", "retrain_epochs"),
    "search": _BASELINE + ("search_epochs", "search_flags"),
    "gsparsity": _RETRAIN + ("search_epochs", "search_flags"),
    "gsparsity_rescaled": _RETRAIN + ("search_epochs", "search_flags"),
    "gsparsity_mask": _RETRAIN + ("search_epochs", "search_flags"),
    "scratch": _RETRAIN + ("search_epochs", "search_flags"),
    "l1": _RETRAIN,
    "random": _RETRAIN,
    "torch_pruning": _RETRAIN + ("search_epochs", "tp_reg", "tp_lr", "tp_steps"),
}


@dataclass
class Record:
    """One finished run: a method at a budget (None for the unpruned model) and a seed."""
    method: str
    budget: float | None  # share of the full model's MACs asked for
    seed: int
    top1: float  # last epoch's val top-1
    macs: int  # of the model at 224x224
    params: int
    seconds: float  # wall time of everything this run trained (its share of the baseline excluded)
    folder: str  # the run's last experiment folder
    key: str = ""


# --- running the scripts -------------------------------------------------------------------

class Runner:
    """Runs the top-level scripts with the bench's common flags, logs each to a file."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args, self.out = args, out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.registry = out / "list_of_models.py"
        if not self.registry.exists():
            self.registry.write_text("MODELS = {}\n")

    def common(self, seed: int) -> list[str]:
        args = self.args
        flags = ["--data", args.data, "-a", args.arch, "--image-size", str(args.image_size), "-b",
                 str(args.batch_size), "-j", str(args.workers), "--seed", str(seed), "-p", "100000",
                 "--path_to_save", str(self.out / "runs")]
        return flags + (["--subset", str(args.subset)] if args.subset else [])

    def script(self, name: str, flags: list[str], run_id: str) -> Path:
        """Run ``name`` with ``flags``; the experiment folder it made."""
        log_file = self.logs / f"{run_id}.log"
        before = set((self.out / "runs").glob(f"*_{run_id}"))
        command = [sys.executable, str(REPO / name), *flags, "--run_id", run_id]
        with open(log_file, "w") as log:
            log.write(shlex.join(command) + "\n")
            log.flush()
            done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = log_file.read_text().splitlines()[-5:]
            raise SystemExit(f"quality bench: {name} failed (exit {done.returncode}), see {log_file}:\n"
                             + "\n".join(tail))
        made = sorted(set((self.out / "runs").glob(f"*_{run_id}")) - before)  # an interrupted bench left others
        if len(made) != 1:
            raise SystemExit(f"quality bench: expected one new folder *_{run_id}, found {made}")
        return made[0]

    def train_unpruned(self, seed: int, epochs: int, run_id: str) -> Path:
        flags = [*self.common(seed), "--epochs", str(epochs), *shlex.split(self.args.baseline_flags)]
        return self.script("main_original.py", flags, run_id)

    def search(self, seed: int, budget: float, baseline: Path, run_id: str) -> Path:
        flags = [*self.common(seed), "--epochs", str(self.args.search_epochs), "--pretrained", str(baseline),
                 "--target-macs", f"{100 * budget:g}%", *shlex.split(self.args.search_flags)]
        return self.script(f"main_search_{SCOPE}.py", flags, run_id)

    def retrain(self, seed: int, folder: Path, epochs: int, run_id: str, *extra: str,
                teacher: Path | None = None) -> Path:
        """Register the search-like ``folder`` and retrain its compressed model (with ``teacher``,
        distilling from it)."""
        name = "q_" + run_id.replace("-", "_")
        register_experiment(name, folder, self.registry, overwrite=True)
        flags = [*self.common(seed), "--epochs", str(epochs), "--baseline_model", name,
                 "--registry", str(self.registry), *shlex.split(self.args.retrain_flags), *extra]
        if teacher is not None:
            flags += ["--distill", str(teacher)]
        return self.script(f"main_reduce_retrain_{SCOPE}.py", flags, run_id)


def last_top1(folder: Path) -> float:
    """The val top-1 of a run's last epoch, from its log."""
    found = [EPOCH_DONE.search(line) for line in (folder / "_log.txt").read_text().splitlines()]
    found = [match for match in found if match]
    if not found:
        raise SystemExit(f"quality bench: no finished epoch in {folder / '_log.txt'}")
    return float(found[-1]["top1"])


# --- masks of the simple baselines ------------------------------------------------------------

def mask_macs(arch: str, mask: Mask, num_classes: int) -> int:
    from gsparsity.budget import mask_macs as budget_mask_macs
    return budget_mask_macs(arch, mask, SCOPE, num_classes)


def uniform_mask(model: torch.nn.Module, keep_share: float, rank: Callable[[torch.Tensor], torch.Tensor]) -> Mask:
    """Every prunable conv keeps ``ceil(keep_share * filters)`` (at least one) filters, the
    first ones in ``rank(weight)``'s descending order."""
    mask = {}
    for prunable in prunable_convs(model, SCOPE):
        weight = prunable.conv.weight.detach()
        kept = max(1, int(torch.ceil(torch.tensor(keep_share * weight.shape[0])).item()))
        row = torch.zeros(weight.shape[0], dtype=torch.bool)
        row[torch.argsort(rank(weight), descending=True, stable=True)[:kept]] = True
        mask[prunable.name] = row
    return mask


def widest_uniform_mask(model: torch.nn.Module, goal_macs: int, num_classes: int, arch: str,
                        rank: Callable[[torch.Tensor], torch.Tensor]) -> Mask:
    """The uniform mask with the largest keep share whose compressed model fits ``goal_macs``."""
    low, high = 0.0, 1.0
    for _ in range(30):  # a share to 1e-9: finer than one filter of the widest layer
        middle = (low + high) / 2
        if mask_macs(arch, uniform_mask(model, middle, rank), num_classes) <= goal_macs:
            low = middle
        else:
            high = middle
    return uniform_mask(model, low, rank)


def l1_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs().flatten(1).sum(dim=1)


def random_ranks(seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return lambda weight: torch.rand(weight.shape[0], generator=generator)


def write_small_model(folder: Path, small: torch.nn.Module, mask: Mask, arch: str, num_classes: int) -> Path:
    """A search-like folder holding ``small`` as a search leaves its compressed model."""
    folder.mkdir(parents=True, exist_ok=True)
    save_compressed_model(folder, small, mask, arch, SCOPE, THRESHOLD, num_classes, epoch=0)
    return folder


def load_full_model(checkpoint: Path, arch: str, num_classes: int) -> torch.nn.Module:
    model = build_model(arch, num_classes)
    model.load_state_dict(load_checkpoint(checkpoint)["state_dict"])
    return model.eval()


def searched_mask(search_folder: Path) -> tuple[Mask, str, int]:
    small_file = searched_small_model(search_folder, saved_small_models(search_folder))
    saved = load_checkpoint(small_file)
    mask = mask_from_record(saved["mask"], arch=saved["arch"], scope=saved["scope"], source=str(small_file))
    return mask, saved["arch"], saved["num_classes"]


def number_of_classes(args: argparse.Namespace) -> int:
    from gsparsity.data import DataSettings, build_datasets
    return build_datasets(DataSettings(data=args.data, image_size=args.image_size, workers=0))[2]


def model_size(small_model_file: Path) -> tuple[int, int]:
    model, _ = load_compressed_model(small_model_file)
    return count_macs_params(model, 224)


# --- Torch-Pruning ----------------------------------------------------------------------------

def torch_pruning_mask(args: argparse.Namespace, baseline: Path, goal_macs: int, seed: int,
                       num_classes: int) -> tuple[torch.nn.Module, Mask]:
    """Torch-Pruning's group-norm sparse training of the baseline, then its pruning to the budget.

    Only the conv1/conv2 filters of each block may go (every other conv is in ``ignored_layers``),
    so its result is a mask of our scope: the channels it kept are found by matching their
    BatchNorm parameters with the sparse-trained model's. Returns (sparse-trained model, mask).
    """
    import copy

    import torch_pruning as tp

    from gsparsity.data import DataSettings, build_loaders
    from gsparsity.distributed import DistContext

    torch.manual_seed(seed)
    model = load_full_model(baseline, args.arch, num_classes)
    example = torch.randn(1, 3, args.image_size, args.image_size)
    prunable = {id(p.conv) for p in prunable_convs(model, SCOPE)}
    ignored = [module for module in model.modules()
               if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and id(module) not in prunable]
    pruner = tp.pruner.GroupNormPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       reg=args.tp_reg, global_pruning=True, pruning_ratio=1.0,
                                       max_pruning_ratio=0.95, iterative_steps=args.tp_steps,
                                       ignored_layers=ignored)
    data = DataSettings(data=args.data, image_size=args.image_size, batch_size=args.batch_size,
                        workers=args.workers, subset=args.subset, seed=seed)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    train = build_loaders(data, ctx).train
    optimizer = torch.optim.SGD(model.parameters(), lr=args.tp_lr, momentum=0.9, weight_decay=1e-4)
    steps = args.search_epochs * len(train)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    criterion = torch.nn.CrossEntropyLoss()
    for epoch in range(args.search_epochs):
        train.sampler.set_epoch(epoch)
        model.train()
        for images, target in train:
            loss = criterion(model(images), target)
            optimizer.zero_grad()
            loss.backward()
            pruner.regularize(model)
            optimizer.step()
            scheduler.step()
    sparse = copy.deepcopy(model).eval()
    model.eval()
    mask = kept_by_matching(sparse, model)
    for _ in range(args.tp_steps):  # each step prunes 1/tp_steps of the channels more, globally
        if mask_macs(args.arch, mask, num_classes) <= goal_macs:
            break
        pruner.step()
        mask = kept_by_matching(sparse, model)
    return sparse, mask


def kept_by_matching(full: torch.nn.Module, pruned: torch.nn.Module) -> Mask:
    """Per prunable conv of ``full``: which of its channels ``pruned`` still has, found by the
    BatchNorm's (weight, bias, running mean) triple, which Torch-Pruning slices unchanged."""
    pruned_modules = dict(pruned.named_modules())
    mask = {}
    for prunable in prunable_convs(full, SCOPE):
        bn, small_bn = prunable.bn, pruned_modules[prunable.bn_name]
        signature = torch.stack([bn.weight, bn.bias, bn.running_mean], dim=1).detach()
        kept = torch.stack([small_bn.weight, small_bn.bias, small_bn.running_mean], dim=1).detach()
        matches = (kept[:, None, :] == signature[None, :, :]).all(dim=2)
        row = matches.any(dim=0)
        if int(row.sum()) != kept.shape[0]:
            raise SystemExit(f"quality bench: cannot tell which channels Torch-Pruning kept in {prunable.name}")
        mask[prunable.name] = row
    return mask


# --- the bench ----------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.runner = Runner(args, self.out)
        self.records_file = self.out / "runs.jsonl"
        self.done: dict[str, Record] = {}
        if self.records_file.exists():
            for line in self.records_file.read_text().splitlines():
                record = Record(**json.loads(line))
                self.done[record.key] = record
        self.num_classes = number_of_classes(args)
        self.started = time.perf_counter()
        self.units_done, self.units_total = 0.0, self.total_units()
        self.baselines: dict[int, Path] = {}

    # Progress is counted in epochs of the full model, a pruned epoch as its MACs share.
    def total_units(self) -> float:
        args = self.args
        per_seed = args.baseline_epochs + (self.total_epochs() if REFERENCE in args.methods else 0)
        per_budget = {"gsparsity": lambda b: args.search_epochs + b * args.retrain_epochs,
                      "gsparsity_rescaled": lambda b: b * args.retrain_epochs,
                      "gsparsity_mask": lambda b: b * args.retrain_epochs,
                      "l1": lambda b: b * args.retrain_epochs, "random": lambda b: b * args.retrain_epochs,
                      "scratch": lambda b: b * self.total_epochs() - b * args.baseline_epochs,
                      "torch_pruning": lambda b: args.search_epochs + b * args.retrain_epochs}
        budgets = sum(per_budget[method](budget) for method in args.methods if method != REFERENCE
                      for budget in args.budgets)
        return len(args.seeds) * (per_seed + budgets)

    def total_epochs(self) -> int:
        """Epochs the unpruned reference trains: baseline, search and retrain together."""
        return self.args.baseline_epochs + self.args.search_epochs + self.args.retrain_epochs

    def key(self, method: str, budget: float | None, seed: int) -> str:
        """Names a run by the settings it depends on, so changing --search-flags, say, leaves the
        baselines, l1 and random runs in runs.jsonl valid."""
        settings = {name: getattr(self.args, name) for name in SETTINGS_OF[method]}
        if not settings.get("distill", True):
            del settings["distill"]  # so that runs recorded before the flag existed keep their keys
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return f"{method}-{budget}-{seed}-{digest}"

    def run(self) -> list[Record]:
        records = []
        for seed in self.args.seeds:
            for budget in self.args.budgets:
                for method in (method for method in self.args.methods if method != REFERENCE):
                    work = getattr(self, method)
                    records.append(self.measure(method, budget, seed, lambda: work(seed, budget), 0))
            if REFERENCE in self.args.methods:  # last: the longest run, and only a reference
                records.append(self.measure(REFERENCE, None, seed, lambda: self.unpruned(seed), self.total_epochs()))
        return records

    def measure(self, method: str, budget: float | None, seed: int, work: Callable[[], tuple[Path, Path]],
                units: float) -> Record:
        key = self.key(method, budget, seed)
        if key in self.done:
            record = self.done[key]
        else:
            started = time.perf_counter()
            folder, model_file = work()
            seconds = time.perf_counter() - started
            top1 = last_top1(folder)
            macs, params = (count_macs_params(build_model(self.args.arch, self.num_classes), 224)
                            if method == "unpruned" else model_size(model_file))
            record = Record(method, budget, seed, top1, int(macs), params, seconds, str(folder), key)
            with open(self.records_file, "a") as file:
                file.write(json.dumps(asdict(record)) + "\n")
        self.units_done += units or self.method_units(method, budget)
        self.progress(record)
        return record

    def made_as_asked(self, record: Record) -> bool:
        """Whether a run from another bench's runs.jsonl had this bench's settings (it is left
        out of the table otherwise: the same method with other --retrain-flags, say)."""
        return not record.key or record.key == self.key(record.method, record.budget, record.seed)

    def method_units(self, method: str, budget: float) -> float:
        args = self.args
        return {"gsparsity": args.search_epochs + budget * args.retrain_epochs,
                "gsparsity_rescaled": budget * args.retrain_epochs,
                "gsparsity_mask": budget * args.retrain_epochs,
                "l1": budget * args.retrain_epochs, "random": budget * args.retrain_epochs,
                "scratch": budget * (args.search_epochs + args.retrain_epochs),
                "torch_pruning": args.search_epochs + budget * args.retrain_epochs}[method]

    def progress(self, record: Record) -> None:
        elapsed = time.perf_counter() - self.started
        share = min(self.units_done / max(self.units_total, 1e-9), 1.0)
        left = elapsed * (1 - share) / share if share > 0 else float("nan")
        budget = f"{100 * record.budget:g}%" if record.budget is not None else "100%"
        print(f"[{100 * share:5.1f}%] {record.method:<13} budget {budget:>4} seed {record.seed}: "
              f"top1 {record.top1:6.2f}  {record.macs / 1e9:.3f} GMac  {record.params / 1e6:.2f} M params  "
              f"{record.seconds:6.0f} s  | about {left / 60:.0f} min left", flush=True)

    # --- what each method does ---------------------------------------------------------------

    def baseline(self, seed: int) -> Path:
        """The pretrained model every pruning method starts from (trained once per seed)."""
        if seed not in self.baselines:
            marker = self.out / f"baseline_seed{seed}.json"
            key = self.key("baseline", None, seed)
            if marker.exists() and json.loads(marker.read_text()).get("key") == key:
                self.baselines[seed] = Path(json.loads(marker.read_text())["checkpoint"])
            else:
                started = time.perf_counter()
                folder = self.runner.train_unpruned(seed, self.args.baseline_epochs, f"baseline-s{seed}-{key[-10:]}")
                self.baselines[seed] = folder / "checkpoint.pth.tar"  # the last epoch's, as every figure here
                marker.write_text(json.dumps({"key": key, "checkpoint": str(self.baselines[seed]),
                                              "top1": last_top1(folder),
                                              "seconds": time.perf_counter() - started}))
            self.units_done += self.args.baseline_epochs
        return self.baselines[seed]

    def teacher(self, seed: int) -> Path | None:
        """With --distill, the baseline every pruned model of ``seed`` starts from teaches its retrain."""
        return self.baseline(seed) if self.args.distill else None

    def run_id(self, method: str, budget: float | None, seed: int) -> str:
        share = f"{100 * budget:g}" if budget is not None else "100"
        return f"{method}-p{share}-s{seed}-{self.key(method, budget, seed)[-10:]}"

    def unpruned(self, seed: int) -> tuple[Path, Path]:
        self.baseline(seed)
        folder = self.runner.train_unpruned(seed, self.total_epochs(), self.run_id("unpruned", None, seed))
        return folder, folder / "checkpoint.pth.tar"

    def search_folder(self, seed: int, budget: float) -> Path:
        """GSparsity's search at this budget (shared by ``gsparsity`` and ``scratch``)."""
        run_id = self.run_id("search", budget, seed)
        for found in sorted((self.out / "runs").glob(f"*_{run_id}")):
            checkpoint = found / "checkpoint.pth.tar"
            if checkpoint.is_file() and load_checkpoint(checkpoint)["epoch"] == self.args.search_epochs:
                return found  # finished (an interrupted bench may have left unfinished ones too)
        return self.runner.search(seed, budget, self.baseline(seed), run_id)

    def gsparsity(self, seed: int, budget: float, method: str = "gsparsity", *extra: str) -> tuple[Path, Path]:
        search = self.search_folder(seed, budget)
        folder = self.runner.retrain(seed, search, self.args.retrain_epochs, self.run_id(method, budget, seed), *extra,
                                     teacher=self.teacher(seed))
        return folder, searched_small_model(search, saved_small_models(search))

    def gsparsity_rescaled(self, seed: int, budget: float) -> tuple[Path, Path]:
        """The same search, its retrain with --rescale-filters (gsparsity/filter_norms.py)."""
        return self.gsparsity(seed, budget, "gsparsity_rescaled", "--rescale-filters")

    def pruned_baseline(self, method: str, seed: int, budget: float, mask: Mask,
                        start: torch.nn.Module, epochs: int) -> tuple[Path, Path]:
        """Compress ``start`` to ``mask``, write it as a search would, retrain it."""
        small = compress_model(start, mask, SCOPE, arch=self.args.arch)
        run_id = self.run_id(method, budget, seed)
        source = write_small_model(self.out / "masks" / run_id, small, mask, self.args.arch, self.num_classes)
        folder = self.runner.retrain(seed, source, epochs, run_id, teacher=self.teacher(seed))
        return folder, saved_small_models(source)[-1]

    def goal(self, budget: float) -> int:
        full = build_model(self.args.arch, self.num_classes)
        return int(budget * count_macs_params(full, 224)[0])

    def l1(self, seed: int, budget: float) -> tuple[Path, Path]:
        model = load_full_model(self.baseline(seed), self.args.arch, self.num_classes)
        mask = widest_uniform_mask(model, self.goal(budget), self.num_classes, self.args.arch, l1_norms)
        return self.pruned_baseline("l1", seed, budget, mask, model, self.args.retrain_epochs)

    def random(self, seed: int, budget: float) -> tuple[Path, Path]:
        model = load_full_model(self.baseline(seed), self.args.arch, self.num_classes)
        widths = widest_uniform_mask(model, self.goal(budget), self.num_classes, self.args.arch, l1_norms)
        draw = random_ranks(seed)
        mask = {name: torch.zeros_like(row).index_fill_(0, torch.argsort(draw(row.float()))[: int(row.sum())], True)
                for name, row in widths.items()}
        return self.pruned_baseline("random", seed, budget, mask, model, self.args.retrain_epochs)

    def gsparsity_mask(self, seed: int, budget: float) -> tuple[Path, Path]:
        """The search's mask on the baseline's weights, as l1 and random take theirs (--inherit start)."""
        return self.gsparsity(seed, budget, "gsparsity_mask", "--inherit", "start")

    def scratch(self, seed: int, budget: float) -> tuple[Path, Path]:
        mask, arch, num_classes = searched_mask(self.search_folder(seed, budget))
        torch.manual_seed(seed)
        fresh = build_pruned_resnet(arch, mask, SCOPE, num_classes)
        run_id = self.run_id("scratch", budget, seed)
        source = write_small_model(self.out / "masks" / run_id, fresh, mask, arch, num_classes)
        epochs = self.args.search_epochs + self.args.retrain_epochs
        folder = self.runner.retrain(seed, source, epochs, run_id, teacher=self.teacher(seed))
        return folder, saved_small_models(source)[-1]

    def torch_pruning(self, seed: int, budget: float) -> tuple[Path, Path]:
        sparse, mask = torch_pruning_mask(self.args, self.baseline(seed), self.goal(budget), seed, self.num_classes)
        return self.pruned_baseline("torch_pruning", seed, budget, mask, sparse, self.args.retrain_epochs)


# --- the summary ----------------------------------------------------------------------------

def summarise(records: list[Record]) -> list[dict]:
    rows = []
    groups: dict[tuple, list[Record]] = {}
    for record in records:
        groups.setdefault((record.method, record.budget), []).append(record)
    for (method, budget), runs in groups.items():
        top1 = [run.top1 for run in runs]
        rows.append({"method": method, "budget": budget, "runs": len(runs),
                     "top1_mean": statistics.mean(top1),
                     "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                     "top1_each": top1,
                     "gmacs": statistics.mean(run.macs for run in runs) / 1e9,
                     "mparams": statistics.mean(run.params for run in runs) / 1e6,
                     "seconds": statistics.mean(run.seconds for run in runs)})
    return sorted(rows, key=lambda row: (-(row["budget"] or 1.0), -row["top1_mean"]))


def format_table(rows: list[dict], full_gmacs: float) -> str:
    lines = ["| budget | method | top-1 (mean ± std) | runs | GMac (% of full) | M params | wall s per run |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        budget = f"{100 * row['budget']:g}%" if row["budget"] is not None else "none"
        lines.append(f"| {budget} | {row['method']} | {row['top1_mean']:.2f} ± {row['top1_std']:.2f} | "
                     f"{row['runs']} | {row['gmacs']:.3f} ({100 * row['gmacs'] / full_gmacs:.1f}%) | "
                     f"{row['mparams']:.2f} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict], records: list[Record], table: str, command: str) -> None:
    (out / "results.json").write_text(json.dumps({"command": command, "summary": rows,
                                                  "runs": [asdict(record) for record in records]}, indent=1))
    with open(out / "results.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[name for name in rows[0] if name != "top1_each"])
        writer.writeheader()
        for row in rows:
            writer.writerow({name: value for name, value in row.items() if name != "top1_each"})
    (out / "results.md").write_text(f"{command}\n\n{table}\n")
    render_png(out / "quality.png", rows)


def render_png(path: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    unpruned = [row for row in rows if row["method"] == "unpruned"]
    for method in dict.fromkeys(row["method"] for row in rows if row["method"] != "unpruned"):
        points = sorted((row["gmacs"], row["top1_mean"], row["top1_std"]) for row in rows if row["method"] == method)
        axes.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                      marker="o", capsize=3, label=method)
    for row in unpruned:
        axes.errorbar([row["gmacs"]], [row["top1_mean"]], yerr=[row["top1_std"]], marker="*", markersize=12,
                      color="black", linestyle="none", label="unpruned (equal epochs)")
    axes.set_xlabel("GMac per 224x224 image")
    axes.set_ylabel("val top-1 (%), last epoch")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def records_of(folders: list[str]) -> list[Record]:
    """The runs that other benches (the same settings, other seeds, say) wrote in their ``--out``."""
    records = []
    for folder in folders:
        path = Path(folder) / "runs.jsonl"
        if not path.is_file():
            raise SystemExit(f"quality bench: --combine {folder}: no runs.jsonl in it")
        records += [Record(**json.loads(line)) for line in path.read_text().splitlines()]
    return records


def parse_budget(text: str) -> float:
    value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a budget is a share of the full MACs in (0, 1) or (0%, 100%): {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data", default="demo")
    add("-a", "--arch", default="resnet50")
    add("--budgets", nargs="+", type=parse_budget, default=[0.5, 0.25], metavar="P%")
    add("--seeds", nargs="*", type=int, default=[0, 1, 2])
    add("--methods", nargs="+", choices=(REFERENCE, *METHODS), default=[REFERENCE, *DEFAULT_METHODS])
    add("--image-size", type=int, default=32)
    add("-b", "--batch-size", type=int, default=64)
    add("-j", "--workers", type=int, default=1)
    add("--subset", type=int, default=None, help="N train and N val images (toy runs)")
    add("--baseline-epochs", type=int, default=12)
    add("--search-epochs", type=int, default=5)
    add("--retrain-epochs", type=int, default=10)
    add("--baseline-flags", default=TRAIN_FLAGS, help="main_original.py's flags beyond the common ones")
    add("--search-flags", default=SEARCH_FLAGS, help="main_search_conv12.py's flags beyond the common ones")
    add("--retrain-flags", default=TRAIN_FLAGS, help="the retrain's flags, the same for every method")
    add("--distill", action="store_true",
        help="every retrain distils from the seed's baseline (the retrain's --distill PATH); "
             "temperature and weight from --retrain-flags, else the retrain's defaults")
    add("--tp-reg", type=float, default=5e-4, help="Torch-Pruning's group-norm regularisation gain")
    add("--tp-lr", type=float, default=0.02, help="lr of Torch-Pruning's sparse training (cosine)")
    add("--tp-steps", type=int, default=200, help="Torch-Pruning's pruning steps to reach the budget, at most")
    add("--out", default="experiments/quality")
    add("--combine", nargs="*", default=[], metavar="DIR",
        help="also summarise the runs recorded in these --out folders: benches of other seeds run in "
             "parallel, each with its own --out (--seeds with no seed then only summarises); runs "
             "made with other settings than this command's are left out")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    command = "python bench/quality.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if "torch_pruning" in args.methods:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            raise SystemExit("quality bench: --methods torch_pruning needs `pip install torch-pruning` "
                             "(requirements-bench.txt)") from None
    print(command)
    print(f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    bench = Bench(args)
    records = bench.run() + [record for record in records_of(args.combine) if bench.made_as_asked(record)]
    rows = summarise(records)
    full_gmacs = count_macs_params(build_model(args.arch, bench.num_classes), 224)[0] / 1e9
    table = format_table(rows, full_gmacs)
    print(table)
    write_outputs(Path(args.out), rows, records, table, command)
    print(f"written: {args.out}/results.json, results.csv, results.md, quality.png")


if __name__ == "__main__":
    main()
