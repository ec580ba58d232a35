"""Results at a glance: a table and a PNG of searches and the retrains that followed them.

For every search folder given, the retrain folders that started from its compressed
model are shown beside it: those given, and those found next to it (a sibling folder
whose ``run_info.json`` names a ``small_model`` inside the search folder). A retrain
given without its search gets its search the same way, if that folder is still there.

Per experiment: the kept filters of every prunable conv (from the mask inside its
compressed model), and per epoch the validation top-1/top-5, the share of zero
filters and the compressed model's MACs at 224x224 (as the run logged them: on the
paper's scale, or conv+fc only for runs from before it was counted so). The epoch
series come from the TensorBoard event files; for what they lack (no events, or an
unreadable file) the ``_log.txt`` lines are parsed instead. A retrained model never
changes width, so its zero-filter share (from its mask) and its MACs (logged once)
hold for every epoch.

Also a command: ``python report.py EXPERIMENT_DIR [...] [--out FILE.png] [--force]``. The
figure never replaces an existing file (also its default, ``report.png`` in the first
folder, on a second run) unless ``--force`` is given.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .checkpoint import atomic_write_bytes, load_checkpoint, refuse_to_replace
from .errors import UserError
from .experiment import LOG_FILE, METRICS_FILE, RUN_INFO
from .compression import compressed_model_file
from .masks import dropped_blocks, mask_from_record, reference_model
from .structure import prunable_convs

SEARCH, RETRAIN = "search", "retrain"
TOP1, TOP5, ZERO_SHARE, GMACS = "top1", "top5", "zero_filter_share", "gmacs"
EVENT_TAGS = {  # TensorBoard tag -> series name, per kind of experiment
    SEARCH: {"val/top1": TOP1, "val/top5": TOP5, "sparsity/zero_filter_share": ZERO_SHARE,
             "complexity/compressed_gmacs": GMACS},
    RETRAIN: {"val/top1": TOP1, "val/top5": TOP5, "complexity/gmacs": GMACS},
}
METRICS, EVENTS, LOG = METRICS_FILE, "TensorBoard events", LOG_FILE  # where the series were read, first first
MAC_UNITS = {"Mac": 1e-9, "KMac": 1e-6, "MMac": 1e-3, "GMac": 1.0}  # -> GMac
FIGURE_WIDTH, GROUP_HEIGHT, DPI = 15.0, 8.0, 100  # inches per figure / per search shown, dots per inch
EXIT_USER_ERROR = 2

# The _log.txt lines (gsparsity.training / search / retrain), after the "YYYY-mm-dd HH:MM:SS " stamp.
STAMPED_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (?P<message>.*)")
EPOCH_DONE = re.compile(r"epoch (?P<epoch>\d+) done: .*?\| val loss \S+ top1 (?P<top1>\S+) top5 (?P<top5>\S+)")
SPARSITY_HEADER = re.compile(r"epoch (?P<epoch>\d+) sparsity")
ALL_ZERO_FILTERS = re.compile(r"\s*all: (?P<zero>\d+)/(?P<total>\d+) zero filters")
SEARCH_MACS = re.compile(r"epoch (?P<epoch>\d+) compressed model: (?P<value>[\d.]+) (?P<unit>[KMG]?Mac)")
RETRAIN_MACS = re.compile(r"compressed \S+ \(\S+\) from .+: (?P<value>[\d.]+) (?P<unit>[KMG]?Mac), ")
INHERITED = re.compile(r"inherited weights, before retraining: top1 (?P<top1>\S+) top5 (?P<top5>\S+)")

Series = dict[str, dict[int, float]]  # series name -> {epoch: value}
Row = tuple[str, float | None, float | None, float | None, float | None]  # epoch, top1, top5, zero %, GMac


@dataclass(frozen=True)
class LayerWidth:
    name: str  # e.g. "layer1.0.conv1"
    stage: str  # e.g. "layer1"
    total: int  # filters of the full model
    surviving: int  # filters the mask keeps (zero-norm ones are pruned)
    kept: int  # channels of the compressed model: the surviving ones, none where the branch is dropped


@dataclass
class Experiment:
    folder: Path
    kind: str  # SEARCH or RETRAIN
    arch: str
    scope: str
    layers: list[LayerWidth]  # empty while a search has no compressed model yet
    series: Series
    source: str  # where the epoch series were read: EVENTS, LOG or both
    inherited: dict[str, float] = field(default_factory=dict)  # retrain: top1/top5 before training
    small_model: Path | None = None  # retrain: the compressed model it started from

    @property
    def epochs(self) -> list[int]:
        return sorted(self.series.get(TOP1, {}))


@dataclass
class Comparison:
    """A search (None if unknown) and the retrains of its compressed model."""

    search: Experiment | None
    retrains: list[Experiment]

    @property
    def experiments(self) -> list[Experiment]:
        return ([self.search] if self.search else []) + self.retrains


# --- reading one experiment folder -------------------------------------------------------

def read_run_info(folder: Path) -> dict:
    path = folder / RUN_INFO
    if not folder.is_dir():
        raise UserError(f"{folder}: no such experiment folder")
    if not path.is_file():
        raise UserError(f"{folder}: no {RUN_INFO} in it, so it is not an experiment folder")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is unreadable ({error})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path} holds no JSON object")
    return info


def experiment_kind(info: dict, folder: Path) -> str:
    script = str(info.get("script", ""))
    if script.startswith("main_search_"):
        return SEARCH
    if script.startswith("main_reduce_retrain_") and isinstance(info.get("small_model"), str):
        return RETRAIN
    raise UserError(f"{folder}: a {script or 'unknown'} run; the report covers the folders of "
                    f"main_search_*.py and main_reduce_retrain_*.py")


def read_experiment(folder: str | os.PathLike) -> Experiment:
    """Everything the report shows about one search or retrain folder."""
    folder = Path(folder)
    info = read_run_info(folder)
    kind = experiment_kind(info, folder)
    arch, scope, layers = read_layer_widths(folder)
    flags = info.get("args") if isinstance(info.get("args"), dict) else {}
    arch = arch or flags.get("arch", "?")
    scope = scope or info.get("scope", "?")
    metrics = read_metrics_series(folder, EVENT_TAGS[kind])
    events = read_event_series(folder, EVENT_TAGS[kind]) if not metrics else {}
    logged, inherited = read_log_series(folder, kind)
    series, source = merge_series({METRICS: metrics, EVENTS: events, LOG: logged})
    if kind == RETRAIN:
        _hold_for_every_epoch(series, layers)
    small_model = Path(info["small_model"]) if kind == RETRAIN else None
    return Experiment(folder, kind, arch, scope, layers, series, source, inherited, small_model)


def read_layer_widths(folder: Path) -> tuple[str | None, str | None, list[LayerWidth]]:
    """(arch, scope, widths per prunable conv in forward order) from the mask inside the
    folder's compressed model; (None, None, []) while there is none."""
    try:
        path = compressed_model_file(folder)
    except UserError:
        return None, None, []  # a search before its first epoch ended
    record = load_checkpoint(path).get("mask")
    if record is None:
        return None, None, []  # a search folder's full model: no small model yet
    mask = mask_from_record(record, source=str(path))
    arch, scope = record["arch"], record["scope"]
    model = reference_model(arch)
    dropped = dropped_blocks(model, mask, scope)
    widths = []
    for prunable in prunable_convs(model, scope):
        surviving = int(mask[prunable.name].sum())
        kept = 0 if prunable.block_name in dropped else surviving
        widths.append(LayerWidth(prunable.name, prunable.stage, mask[prunable.name].numel(), surviving, kept))
    return arch, scope, widths


def read_metrics_series(folder: Path, tags: dict[str, str]) -> Series:
    """{series name: {epoch: value}} for the ``tags`` in the folder's ``metrics.jsonl`` (runs made
    before it existed have none: the events and the log are read instead). A resumed run may
    have written an epoch twice; its last record holds."""
    path = folder / METRICS_FILE
    series: Series = {}
    if not path.is_file():
        return series
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed process
            continue
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            continue
        for tag, name in tags.items():
            if isinstance(record.get(tag), (int, float)):
                series.setdefault(name, {})[record["epoch"]] = float(record[tag])
    return series


def read_event_series(folder: Path, tags: dict[str, str]) -> Series:
    """{series name: {epoch: value}} for the ``tags`` found in the folder's event files."""
    if not any(folder.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    try:
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep all
        accumulator.Reload()
        available = set(accumulator.Tags().get("scalars", []))
        return {name: {event.step: float(event.value) for event in accumulator.Scalars(tag)}
                for tag, name in tags.items() if tag in available}
    except Exception:  # a damaged event file: the log still has every figure
        return {}


def read_log_series(folder: Path, kind: str) -> tuple[Series, dict[str, float]]:
    """(the epoch series, the retrain's top-1/5 before training) parsed from ``_log.txt``.

    A resumed run appends to the log, so a repeated epoch takes its last value.
    """
    series: Series = {TOP1: {}, TOP5: {}, ZERO_SHARE: {}, GMACS: {}}
    inherited: dict[str, float] = {}
    path = folder / LOG_FILE
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    sparsity_epoch = None
    for line in lines:
        stamped = STAMPED_LINE.fullmatch(line)
        message = stamped["message"] if stamped else line  # report lines continue without a stamp
        if found := EPOCH_DONE.match(message):
            series[TOP1][int(found["epoch"])] = float(found["top1"])
            series[TOP5][int(found["epoch"])] = float(found["top5"])
        elif found := SPARSITY_HEADER.match(message):
            sparsity_epoch = int(found["epoch"])
        elif (found := ALL_ZERO_FILTERS.match(message)) and sparsity_epoch is not None:
            series[ZERO_SHARE][sparsity_epoch] = int(found["zero"]) / max(int(found["total"]), 1)
        elif found := SEARCH_MACS.match(message):
            series[GMACS][int(found["epoch"])] = float(found["value"]) * MAC_UNITS[found["unit"]]
        elif kind == RETRAIN and (found := RETRAIN_MACS.match(message)):
            series[GMACS][0] = float(found["value"]) * MAC_UNITS[found["unit"]]
        elif found := INHERITED.match(message):
            inherited = {TOP1: float(found["top1"]), TOP5: float(found["top5"])}
    return {name: values for name, values in series.items() if values}, inherited


def merge_series(by_source: dict[str, Series]) -> tuple[Series, str]:
    """Each series from the first source (in ``by_source``'s order) that has it; and the source(s)."""
    merged: Series = {}
    used = []
    for name in (TOP1, TOP5, ZERO_SHARE, GMACS):
        for source, series in by_source.items():
            if series.get(name):
                merged[name] = dict(sorted(series[name].items()))
                used.append(source)
                break
    return merged, " + ".join(source for source in by_source if source in used) or "nothing yet"


def _hold_for_every_epoch(series: Series, layers: list[LayerWidth]) -> None:
    """A retrain keeps its width: its MACs (logged once) and zero-filter share hold every epoch."""
    epochs = sorted(series.get(TOP1, {}))
    if series.get(GMACS) and epochs:
        first = series[GMACS][min(series[GMACS])]
        series[GMACS] = {epoch: first for epoch in epochs}
    if layers and epochs:
        share = zero_filter_share(layers)
        series[ZERO_SHARE] = {epoch: share for epoch in epochs}


def zero_filter_share(layers: list[LayerWidth]) -> float:
    total = sum(layer.total for layer in layers)
    return sum(layer.total - layer.surviving for layer in layers) / max(total, 1)


# --- pairing searches with their retrains ------------------------------------------------

def started_from(retrain: Experiment, search_folder: Path) -> bool:
    """Whether ``retrain`` retrained the compressed model of ``search_folder``.

    Compared by folder name, so that a tree of experiments copied elsewhere still pairs.
    """
    return retrain.small_model is not None and retrain.small_model.parent.name == search_folder.name


def find_retrains(search_folder: Path) -> list[Path]:
    """Sibling retrain folders that started from this search's compressed model, oldest first."""
    found = []
    for sibling in sorted(search_folder.parent.iterdir()):
        info_file = sibling / RUN_INFO
        if sibling == search_folder or not info_file.is_file():
            continue
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not ours to judge: only the folders asked for must be readable
        small_model = info.get("small_model") if isinstance(info, dict) else None
        if isinstance(small_model, str) and Path(small_model).parent.name == search_folder.name:
            found.append(sibling)
    return found


def find_search(retrain: Experiment) -> Path | None:
    """The search folder next to ``retrain`` that it started from, if it is still there."""
    if retrain.small_model is None:
        return None
    folder = retrain.folder.parent / retrain.small_model.parent.name
    try:
        return folder if experiment_kind(read_run_info(folder), folder) == SEARCH else None
    except UserError:
        return None


def compare(folders: Sequence[str | os.PathLike], find: bool = True) -> list[Comparison]:
    """One Comparison per search with its retrains; a retrain without its search stands alone.

    ``find``: also show the searches of the retrains given and the retrains of the
    searches, found next to them (see the module docstring).
    """
    given = [read_experiment(folder) for folder in folders]
    searches = [experiment for experiment in given if experiment.kind == SEARCH]
    retrains = [experiment for experiment in given if experiment.kind == RETRAIN]
    if find:
        searches += _unseen(searches, [find_search(retrain) for retrain in retrains])
        retrains += _unseen(retrains, [folder for search in searches for folder in find_retrains(search.folder)])
    comparisons = [Comparison(search, [retrain for retrain in retrains if started_from(retrain, search.folder)])
                   for search in searches]
    paired = {retrain.folder for comparison in comparisons for retrain in comparison.retrains}
    return comparisons + [Comparison(None, [retrain]) for retrain in retrains if retrain.folder not in paired]


def _unseen(known: list[Experiment], folders: list[Path | None]) -> list[Experiment]:
    """The experiments of ``folders`` (Nones skipped) that are not already ``known``, each once."""
    seen = {experiment.folder.resolve() for experiment in known}
    found = []
    for folder in folders:
        if folder is not None and folder.resolve() not in seen:
            seen.add(folder.resolve())
            found.append(read_experiment(folder))
    return found


# --- the table ---------------------------------------------------------------------------

def table_rows(experiment: Experiment) -> list[Row]:
    """(epoch label, top1, top5, zero-filter share in %, GMac) per epoch; a retrain starts with
    the inherited weights' row, labelled "start"."""
    series = experiment.series
    rows = []
    if experiment.inherited:
        zero = zero_filter_share(experiment.layers) * 100 if experiment.layers else None
        gmacs = next(iter(series.get(GMACS, {}).values()), None)
        rows.append(("start", experiment.inherited[TOP1], experiment.inherited[TOP5], zero, gmacs))
    for epoch in experiment.epochs:
        zero = series.get(ZERO_SHARE, {}).get(epoch)
        rows.append((str(epoch), series[TOP1][epoch], series.get(TOP5, {}).get(epoch),
                     None if zero is None else zero * 100, series.get(GMACS, {}).get(epoch)))
    return rows


def kept_summary(layers: list[LayerWidth]) -> str:
    """E.g. "layer1 380/384, layer2 1000/1024; all 1380/1408 filters (98.0%)": surviving of all."""
    stages: dict[str, list[int]] = {}  # stage -> [surviving filters, all filters]
    for layer in layers:
        counts = stages.setdefault(layer.stage, [0, 0])
        counts[0] += layer.surviving
        counts[1] += layer.total
    per_stage = ", ".join(f"{stage} {surviving}/{total}" for stage, (surviving, total) in stages.items())
    surviving = sum(layer.surviving for layer in layers)
    total = sum(layer.total for layer in layers)
    return f"{per_stage}; all {surviving}/{total} filters ({100 * surviving / max(total, 1):.1f}%)"


def format_table(comparisons: list[Comparison]) -> str:
    lines = []
    for comparison in comparisons:
        for experiment in comparison.experiments:
            lines.append(f"{experiment.kind} {experiment.folder} ({experiment.arch}, {experiment.scope}; "
                         f"from {experiment.source})")
            if experiment.layers:
                lines.append(f"  kept filters: {kept_summary(experiment.layers)}")
            lines.append(f"  {'epoch':>6} {'top1':>8} {'top5':>8} {'zero filters':>13} {'GMac':>8}")
            for label, top1, top5, zero, gmacs in table_rows(experiment):
                lines.append(f"  {label:>6} {_cell(top1, '8.3f')} {_cell(top5, '8.3f')} "
                             f"{_cell(zero, '12.1f')}% {_cell(gmacs, '8.3f')}")
            if not experiment.epochs:
                lines.append("  (no epoch finished yet)")
        lines.append("")
    return "\n".join(lines)


def _cell(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return format(value, spec) if value is not None else "-".rjust(width)


# --- the figure --------------------------------------------------------------------------

def figure_size(comparison_count: int) -> tuple[float, float]:
    """(width, height) in inches: one band of panels per comparison."""
    return FIGURE_WIDTH, GROUP_HEIGHT * comparison_count


def render_png(comparisons: list[Comparison]) -> bytes:
    """The PNG: per comparison, kept filters per layer above, then zero-filter share,
    top-1 and GMac per epoch (a retrain continues the search's epoch axis)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figure_size(len(comparisons)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    bands = figure.subfigures(len(comparisons), 1, squeeze=False)[:, 0]
    for band, comparison in zip(bands, comparisons):
        _draw_comparison(band, comparison)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _draw_comparison(band, comparison: Comparison) -> None:
    grid = band.add_gridspec(2, 3, height_ratios=[1, 1])
    first = comparison.search or comparison.retrains[0]
    band.suptitle(f"{first.arch}, {first.scope}: {first.folder.name}", fontsize=11)
    _draw_layer_widths(band.add_subplot(grid[0, :]), first.layers)
    retrain_start = (max(comparison.search.epochs) + 1) if comparison.search and comparison.search.epochs else 0
    panels = [(ZERO_SHARE, "zero filters (%)", 100.0), (TOP1, "val top-1 (%)", 1.0),
              (GMACS, "GMac at 224x224", 1.0)]
    for column, (name, title, scale) in enumerate(panels):
        axes = band.add_subplot(grid[1, column])
        _draw_epoch_series(axes, comparison, name, scale, retrain_start)
        axes.set_title(title, fontsize=10)


def _draw_layer_widths(axes, layers: list[LayerWidth]) -> None:
    if not layers:
        axes.text(0.5, 0.5, "no compressed model yet", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return
    positions = range(len(layers))
    axes.bar(positions, [layer.total for layer in layers], color="0.85", label="filters of the full model")
    stages = list(dict.fromkeys(layer.stage for layer in layers))
    for index, stage in enumerate(stages):
        members = [(position, layer) for position, layer in zip(positions, layers) if layer.stage == stage]
        axes.bar([position for position, _ in members], [layer.kept for _, layer in members],
                 color=f"C{index}", label=f"kept, {stage}")
    axes.set_xticks(list(positions), [layer.name for layer in layers], rotation=90,
                    fontsize=max(4.0, min(8.0, 400 / len(layers))))
    axes.set_xlim(-0.6, len(layers) - 0.4)
    axes.set_ylabel("channels")
    axes.set_title(f"kept filters per layer: {kept_summary(layers)}", fontsize=10)
    axes.legend(fontsize=8, ncols=len(stages) + 1, loc="upper left")


def _draw_epoch_series(axes, comparison: Comparison, name: str, scale: float, retrain_start: int) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if comparison.search and comparison.search.series.get(name):
        values = comparison.search.series[name]
        axes.plot(list(values), [value * scale for value in values.values()], "o-", color="C0", label="search")
    for index, retrain in enumerate(comparison.retrains, start=1):
        values = retrain.series.get(name, {})
        epochs = [retrain_start + epoch for epoch in values]
        points = [value * scale for value in values.values()]
        if name in retrain.inherited:  # the compressed model before any retraining
            epochs, points = [retrain_start - 0.5] + epochs, [retrain.inherited[name] * scale] + points
        if epochs:
            axes.plot(epochs, points, "s-", color=f"C{index}", label=retrain.folder.name)
    if comparison.search and comparison.retrains:
        axes.axvline(retrain_start - 0.5, color="0.5", linestyle=":", linewidth=1)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.xaxis.set_major_formatter(FuncFormatter(
        lambda x, _: f"{x:g}" if x < retrain_start else f"r{x - retrain_start:g}"))
    axes.set_xlabel("epoch (rN: retrain epoch N)" if comparison.retrains else "epoch", fontsize=9)
    axes.grid(alpha=0.3)
    if axes.has_data():
        axes.legend(fontsize=7)
    else:
        axes.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=axes.transAxes)


# --- the command ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python report.py",
        description="Print a table and draw a PNG of search and retrain experiment folders: kept "
                    "filters per layer, zero-filter share, top-1 and MACs per epoch. The retrains of "
                    "a search that sit next to it are added.")
    parser.add_argument("folders", nargs="+", metavar="EXPERIMENT_DIR")
    parser.add_argument("--out", metavar="FILE.png",
                        help="where to write the figure (default: report.png in the first folder)")
    parser.add_argument("--force", action="store_true",
                        help="replace the figure if the file already exists (e.g. from an earlier report)")
    parser.add_argument("--no-find", dest="find", action="store_false",
                        help="show only the folders given, not the retrains/search found next to them")
    return parser


def write_report(folders: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
                 find: bool = True, force: bool = False) -> tuple[str, Path]:
    """(the table, the PNG written) for ``folders``; an existing file at ``out`` is replaced
    only with ``force``."""
    out = Path(out) if out is not None else Path(folders[0]) / "report.png"
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the figure is a PNG, give a name ending in .png")
    if not force:
        refuse_to_replace([out], "--out another file")  # before reading the folders and drawing
    comparisons = compare(folders, find)
    png = render_png(comparisons)
    if not force:
        refuse_to_replace([out], "--out another file")  # again: something may have appeared meanwhile
    atomic_write_bytes(out, png)
    return format_table(comparisons), out


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        table, out = write_report(args.folders, args.out, args.find, args.force)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    print(table)
    print(f"wrote {out}")
