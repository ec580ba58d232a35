"""The model registry, ``list_of_models.py``: names for the models that searches produced.

The registry is a Python file that people may edit by hand, but the tools treat it as
data only: it is parsed with :mod:`ast` and its ``MODELS = {...}`` literal evaluated
with :func:`ast.literal_eval`; it is never imported or executed. Registering a model
rewrites only the source text of that literal, from validated strings written with
``repr()``, and leaves the rest of the file byte for byte as it was (but for a leading
UTF-8 BOM, which is read and then dropped: the file is written as plain UTF-8).
A relative ``experiment_dir`` starts from the registry file's folder; for a registry
that is a symlink, from the folder of the file it points to, so that every reader of
the shared file finds the same folders.

The original's ``list_of_models.py`` is read too: its lines ``name = 'folder'``, which
its retrain scripts imported and evaluated as ``list_of_models.<name>``, are entries that
name only their experiment folder (``{"experiment_dir": folder}``), read from the parsed
source as the literal is. Such an entry has no scope or arch field: :func:`resolve` takes
them from the folder's files. Its ``small_model_<scope>_<threshold>.pth.tar`` of 1e-06 (the
original retrain's default threshold; else the newest) gives the scope: the original names
its compressed models so, while its mask is ``mask_<threshold>.npy`` for both scopes. Beside
the original's ``.npy`` mask the arch is resnet50, the only one the original compresses;
beside our ``mask_<scope>_<threshold>.json`` it is the one the small model records.
Besides such lines and the literal, the file may hold only strings (its docstring) and
comments: anything else is refused, naming its line, since the file is never run.
Registering writes the ``MODELS`` literal (appended if the file has none) and leaves those
lines as they are; a name taken by one is not replaced or removed.

Also a command: ``python -m gsparsity.registry NAME EXPERIMENT_FOLDER`` registers the
compressed model that a finished search left in its folder.
"""
from __future__ import annotations

import argparse
import ast
import json
import keyword
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .checkpoint import atomic_write_text, load_checkpoint
from .errors import UserError
from .structure import SCOPES

REGISTRY_VARIABLE = "GSPARSITY_REGISTRY"  # names the default registry file, if set
# The working folder's list_of_models.py, as the original's scripts read theirs: an installed
# package has no repository folder to find it in.
DEFAULT_REGISTRY = Path(os.environ.get(REGISTRY_VARIABLE) or "list_of_models.py")
MODELS_VARIABLE = "MODELS"
FIELDS = ("experiment_dir", "small_model", "mask", "scope", "arch")  # every entry has these
SMALL_MODEL_PATTERN = re.compile(r"small_model_(?P<suffix>.+)\.pth\.tar")  # as small_model_file names them
SCOPED_SMALL_MODEL = re.compile(rf"small_model_(?P<scope>{'|'.join(SCOPES)})_(?P<threshold>.+)\.pth\.tar")
ORIGINAL_ARCH = "resnet50"  # the only architecture the original compresses
ORIGINAL_THRESHOLD = "1e-06"  # the original retrain's default --pruning_threshold, as its file names write it
FORBIDDEN_CATEGORIES = {"Cc", "Zl", "Zp"}  # control characters and line/paragraph breaks
INDENT = "    "


@dataclass(frozen=True)
class RegisteredModel:
    """A registry entry with its paths made absolute and checked to exist."""

    name: str
    experiment_dir: Path
    small_model: Path
    mask: Path
    scope: str
    arch: str


# --- reading ---------------------------------------------------------------------------

def read_registry(path: str | os.PathLike = DEFAULT_REGISTRY) -> dict[str, dict[str, str]]:
    """Every entry of the registry, as ``{name: {field: value}}``, without running the file;
    a line ``name = 'folder'`` of the original's reads as ``{"experiment_dir": folder}``."""
    path = Path(path)
    return _parse(_read_source(path), path).entries


def _read_source(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"model registry {path}: no such file")
    try:
        # utf-8-sig: a BOM that an editor added is dropped (Python ignores it too, ast would not).
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"model registry {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


@dataclass
class _Parsed:
    """What the registry's source holds: the MODELS literal and the original's lines."""

    node: ast.expr | None  # the expression assigned to MODELS; None: the file has none
    models: dict[str, dict[str, str]]  # that literal's entries
    lines: dict[str, int]  # name -> line number, of the original's `name = 'folder'` lines
    entries: dict[str, dict[str, str]]  # both, in the order of the file


def _parse(source: str, path: Path) -> _Parsed:
    """Every top-level statement must be a string (a docstring), the MODELS literal, or a
    line ``name = 'folder'`` of the original's; anything else is refused, naming its line."""
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as error:
        raise UserError(f"model registry {path}: syntax error on line {error.lineno}: {error.msg}") from None
    nodes, lines, segments = [], {}, [{}]  # segments: line entries before and after the literal
    for statement in tree.body:
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) \
                and isinstance(statement.value.value, str):
            continue
        if isinstance(statement, (ast.Assign, ast.AnnAssign)) and statement.value is not None \
                and _assigns_models(statement):
            nodes.append(statement.value)
            segments.append({})
            continue
        name, folder = _folder_line(statement, source, path)
        if name in lines:
            raise UserError(f"model registry {path}: {name!r} is assigned on lines {lines[name]} and "
                            f"{statement.lineno}; keep one")
        lines[name] = statement.lineno
        segments[-1][name] = {"experiment_dir": folder}
    if len(nodes) > 1:
        raise UserError(f"model registry {path}: {MODELS_VARIABLE} is assigned {len(nodes)} times; keep one")
    models = _literal_models(nodes[0], path) if nodes else {}
    both = [name for name in models if name in lines]
    if both:
        raise UserError(f"model registry {path}: {both[0]!r} is both an entry of {MODELS_VARIABLE} and a line "
                        f"of its own (line {lines[both[0]]}); keep one")
    entries = {**segments[0], **models, **(segments[1] if nodes else {})}
    return _Parsed(node=nodes[0] if nodes else None, models=models, lines=lines, entries=entries)


def _folder_line(statement: ast.stmt, source: str, path: Path) -> tuple[str, str]:
    """(name, folder) of a line ``name = 'folder'``, the original's form of an entry."""
    if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name) and isinstance(statement.value, ast.Constant)
            and isinstance(statement.value.value, str)):
        return statement.targets[0].id, statement.value.value
    text = (ast.get_source_segment(source, statement) or "").splitlines()[:1] or [""]
    raise UserError(f"model registry {path}: line {statement.lineno} ({text[0][:60]!r}) is neither a line "
                    f"name = 'folder' nor the {MODELS_VARIABLE} = {{...}} literal; the file is read as data, "
                    f"never run, so nothing else may be in it but strings and comments")


def _assigns_models(statement: ast.Assign | ast.AnnAssign) -> bool:
    targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
    return any(isinstance(target, ast.Name) and target.id == MODELS_VARIABLE for target in targets)


def _literal_models(node: ast.expr, path: Path) -> dict[str, dict[str, str]]:
    try:
        models = ast.literal_eval(node)
    except (ValueError, TypeError, RecursionError):  # names, calls, operators, absurd nesting
        raise UserError(f"model registry {path}: {MODELS_VARIABLE} (line {node.lineno}) must be a "
                        f"literal dict of strings, with no names, calls or operators in it") from None
    if not isinstance(models, dict):
        raise UserError(f"model registry {path}: {MODELS_VARIABLE} is a {type(models).__name__}, not a dict")
    for name, entry in models.items():
        if not isinstance(name, str) or not isinstance(entry, dict):
            raise UserError(f"model registry {path}: entry {name!r} must map a name to a dict")
        if not all(isinstance(key, str) and isinstance(value, str) for key, value in entry.items()):
            raise UserError(f"model registry {path}: entry {name!r}: every field and value must be a string")
    return models


# --- the files a search leaves ---------------------------------------------------------

def small_model_file(scope: str, threshold: float) -> str:
    """The name a search gives its compressed model (the original's names: 1e-06, not 1e-6)."""
    return f"small_model_{scope}_{threshold:g}.pth.tar"


def mask_file(scope: str, threshold: float) -> str:
    return f"mask_{scope}_{threshold:g}.json"


def saved_small_models(folder: Path) -> list[Path]:
    """The compressed models a search left in ``folder``, one per threshold it saved."""
    return sorted(file for file in folder.iterdir() if SMALL_MODEL_PATTERN.fullmatch(file.name))


# --- looking up -------------------------------------------------------------------------

def resolve(name: str, path: str | os.PathLike = DEFAULT_REGISTRY) -> RegisteredModel:
    """The registered model called ``name``, its files checked to still be there."""
    path = Path(path)
    models = read_registry(path)
    if name not in models:
        raise UserError(_unknown_name_message(name, models, path))
    entry = models[name]
    if set(entry) == {"experiment_dir"}:  # the original's line name = 'folder'
        return _resolve_folder(name, entry["experiment_dir"], path)
    missing = [field for field in FIELDS if field not in entry]
    if missing:
        raise UserError(f"model registry {path}: entry {name!r} lacks {', '.join(missing)}")
    if entry["scope"] not in SCOPES:
        raise UserError(f"model registry {path}: entry {name!r} has scope {entry['scope']!r}; "
                        f"expected one of {', '.join(SCOPES)}")
    experiment_dir = Path(os.path.abspath(_registry_folder(path) / entry["experiment_dir"]))
    if not experiment_dir.is_dir():
        raise UserError(f"model {name!r}: its experiment folder {experiment_dir} is gone (registered in {path})")
    files = {field: Path(os.path.abspath(experiment_dir / entry[field])) for field in ("small_model", "mask")}
    for field, file in files.items():
        if not file.is_file():
            raise UserError(f"model {name!r}: its {field.replace('_', ' ')} {file} is gone (registered in {path})")
    return RegisteredModel(name=name, experiment_dir=experiment_dir, small_model=files["small_model"],
                           mask=files["mask"], scope=entry["scope"], arch=entry["arch"])


def _resolve_folder(name: str, stored: str, path: Path) -> RegisteredModel:
    """An entry that names only its experiment folder: its small model (``default_small_model``)
    gives the scope, the mask beside it the arch (module docstring)."""
    folder = Path(os.path.abspath(_registry_folder(path) / _check_path_text(f"model {name!r}: folder", stored)))
    if not folder.is_dir():
        raise UserError(f"model {name!r}: its experiment folder {folder} is gone (registered in {path})")
    small_models = [file for file in saved_small_models(folder) if SCOPED_SMALL_MODEL.fullmatch(file.name)]
    if not small_models:
        raise UserError(f"model {name!r}: its experiment folder {folder} holds no small_model_<"
                        f"{'|'.join(SCOPES)}>_<threshold>.pth.tar (registered in {path})")
    small_model = default_small_model(small_models)
    found = SCOPED_SMALL_MODEL.fullmatch(small_model.name)
    ours = folder / f"mask_{found['scope']}_{found['threshold']}.json"
    originals = folder / f"mask_{found['threshold']}.npy"
    if ours.is_file():
        mask, arch = ours, load_checkpoint(small_model).get("arch")
        if not isinstance(arch, str):
            raise UserError(f"model {name!r}: {small_model} does not record its arch")
    elif originals.is_file():
        mask, arch = originals, ORIGINAL_ARCH
    else:
        raise UserError(f"model {name!r}: {folder} has no mask beside {small_model.name} "
                        f"(neither {ours.name} nor the original's {originals.name})")
    return RegisteredModel(name=name, experiment_dir=folder, small_model=small_model, mask=mask,
                           scope=found["scope"], arch=arch)


def default_small_model(small_models: list[Path]) -> Path:
    """Of a folder's ``small_model_<scope>_<threshold>.pth.tar``, the one of 1e-06, which the
    original's retrain takes by default (its search also saves 1e-05 ... 0.1 when it ends,
    after it); else the newest."""
    default = [file for file in small_models if SCOPED_SMALL_MODEL.fullmatch(file.name)["threshold"]
               == ORIGINAL_THRESHOLD]
    return max(default or small_models, key=lambda file: file.stat().st_mtime)


def _unknown_name_message(name: str, models: dict, path: Path) -> str:
    if not models:
        return (f"no model {name!r}: the model registry {path} is empty; add one with "
                f"main_search_*.py --register NAME, or python -m gsparsity.registry NAME EXPERIMENT_FOLDER")
    return f"no model {name!r} in the model registry {path}; known: {', '.join(sorted(models))}"


def _registry_folder(path: Path) -> Path:
    """The folder that relative entries start from. For a symlinked registry, the shared file's
    own folder, so that an entry written through the link resolves for every reader of it."""
    return Path(os.path.realpath(path) if path.is_symlink() else os.path.abspath(path)).parent


# --- validating -------------------------------------------------------------------------

def check_model_name(name: str) -> str:
    """A registry name must be a Python identifier that is not a keyword."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise UserError(f"model name {name!r}: use a Python identifier (letters, digits and _, "
                        f"not starting with a digit) that is not a Python keyword")
    return name


def _check_path_text(what: str, value: str | os.PathLike) -> str:
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None  # may be bytes
    if not isinstance(text, str) or not text:
        raise UserError(f"{what} must be a non-empty path, got {value!r}")
    if any(unicodedata.category(character) in FORBIDDEN_CATEGORIES for character in text):
        raise UserError(f"{what} {text!r}: control characters and line breaks are not allowed in paths")
    return text


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise UserError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    return scope


def _check_arch(arch: str) -> str:
    if not isinstance(arch, str) or not arch.isidentifier():
        raise UserError(f"arch must be an identifier such as resnet50, got {arch!r}")
    return arch


def _file_in_folder(what: str, folder: Path, file_name: str) -> str:
    """``file_name`` as a path relative to the experiment folder, checked to exist there."""
    file = Path(os.path.abspath(folder / file_name))
    if not file.is_file():
        raise UserError(f"{what} {file}: no such file")
    try:
        return file.relative_to(folder).as_posix()
    except ValueError:
        raise UserError(f"{what} {file}: must lie in the experiment folder {folder}") from None


def _stored_experiment_dir(folder: Path, registry: Path) -> str:
    """Relative to the registry's folder when under it (so the repo can move), else absolute."""
    try:
        return _check_path_text("experiment folder", folder.relative_to(_registry_folder(registry)).as_posix())
    except ValueError:
        return _check_path_text("experiment folder", str(folder))


# --- writing ----------------------------------------------------------------------------

def register(name: str, experiment_dir: str | os.PathLike, small_model: str, mask: str, scope: str,
             arch: str, path: str | os.PathLike = DEFAULT_REGISTRY, overwrite: bool = False) -> None:
    """Add (or with ``overwrite=True`` replace) the entry ``name`` in the registry file."""
    path = Path(path)
    check_model_name(name)
    _check_scope(scope)
    _check_arch(arch)
    folder = Path(os.path.abspath(_check_path_text("experiment folder", experiment_dir)))
    if not folder.is_dir():
        raise UserError(f"experiment folder {folder}: no such folder")
    entry = {
        "experiment_dir": _stored_experiment_dir(folder, path),
        "small_model": _file_in_folder("small model", folder, _check_path_text("small model", small_model)),
        "mask": _file_in_folder("mask", folder, _check_path_text("mask", mask)),
        "scope": scope,
        "arch": arch,
    }
    source = _read_source(path)
    parsed = _parse(source, path)
    _check_name_free(name, parsed, path, overwrite)
    models = {**parsed.models, name: entry}
    _write_models(path, source, parsed, models)
    if read_registry(path).get(name) != entry:  # defence in depth: what is on disk is what we meant
        raise UserError(f"model registry {path}: entry {name!r} did not read back as written")


def check_can_register(name: str, path: str | os.PathLike = DEFAULT_REGISTRY, overwrite: bool = False) -> None:
    """Refuse now what :func:`register` would refuse about ``name`` or the registry file, so a
    search given ``--register`` fails before it trains rather than after; reads, never writes."""
    path = Path(path)
    check_model_name(name)
    _check_name_free(name, _parse(_read_source(path), path), path, overwrite)
    _check_writable(path)


def _check_writable(path: Path) -> None:
    """The registry is rewritten atomically: a temporary file in its (real) folder, renamed
    over it. A read-only copy (say, next to scripts installed for a whole cluster) would
    otherwise be found out only after the search."""
    real = Path(os.path.realpath(path))
    if not (os.access(real, os.W_OK) and os.access(real.parent, os.W_OK)):
        raise UserError(f"model registry {path}: cannot write to it or to its folder; "
                        f"give --registry FILE a copy you can write")


def registry_file(flag: str | None) -> Path:
    """The registry a ``--registry FILE`` flag names, or the default one."""
    return Path(flag) if flag else DEFAULT_REGISTRY


def registers_itself(name: str, folder: str | os.PathLike | None, path: str | os.PathLike = DEFAULT_REGISTRY) -> bool:
    """Whether ``name`` is already the entry of experiment ``folder`` (a search resumed after it
    registered: its entry is brought up to date rather than refused as taken)."""
    if folder is None:
        return False
    path = Path(path)
    entry = read_registry(path).get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("experiment_dir"), str):
        return False
    registered = os.path.realpath(_registry_folder(path) / entry["experiment_dir"])
    return registered == os.path.realpath(folder)


def _check_name_free(name: str, parsed: _Parsed, path: Path, overwrite: bool) -> None:
    if name in parsed.lines:
        raise UserError(f"model registry {path} has {name!r} on line {parsed.lines[name]}, a line "
                        f"{name} = 'folder' that is kept as written; choose another name, or edit that line")
    if name in parsed.models and not overwrite:
        raise UserError(f"model registry {path} already has {name!r} (experiment_dir "
                        f"{parsed.models[name].get('experiment_dir')!r}); choose another name, or replace that "
                        f"entry with python -m gsparsity.registry {name} FOLDER --overwrite")


def unregister(name: str, path: str | os.PathLike = DEFAULT_REGISTRY) -> None:
    """Remove the entry ``name`` from the registry file (its files stay on disk)."""
    path = Path(path)
    source = _read_source(path)
    parsed = _parse(source, path)
    if name in parsed.lines:
        raise UserError(f"model registry {path}: {name!r} is the line {parsed.lines[name]}, "
                        f"{name} = 'folder', which is kept as written; remove it by hand")
    if name not in parsed.models:
        raise UserError(_unknown_name_message(name, parsed.entries, path))
    models = {key: value for key, value in parsed.models.items() if key != name}
    _write_models(path, source, parsed, models)


def register_experiment(name: str, folder: str | os.PathLike, path: str | os.PathLike = DEFAULT_REGISTRY,
                        overwrite: bool = False) -> RegisteredModel:
    """Register the compressed model a search left in ``folder`` (its newest, if several).

    Scope and arch are read from the small model file itself.
    """
    check_model_name(name)  # before any slow work, so a typo fails at once
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"experiment folder {folder}: no such folder")
    small_models = saved_small_models(folder)
    if not small_models:
        raise UserError(f"experiment folder {folder} holds no small_model_*.pth.tar: "
                        f"has its search finished an epoch?")
    small_model = searched_small_model(folder, small_models)
    mask_name = f"mask_{SMALL_MODEL_PATTERN.fullmatch(small_model.name)['suffix']}.json"
    saved = load_checkpoint(small_model)
    register(name, folder, small_model.name, mask_name, saved.get("scope"), saved.get("arch"),
             path=path, overwrite=overwrite)
    return resolve(name, path)


def searched_small_model(folder: Path, small_models: list[Path]) -> Path:
    """The compressed model of the search's own ``--pruning_threshold`` (a search saves the
    original's other thresholds beside it); where run_info.json does not say it (a folder of
    the original's), the 1e-06 one, the original retrain's default; else the newest."""
    try:
        info = json.loads((folder / "run_info.json").read_text(encoding="utf-8"))
        own = [folder / small_model_file(info["scope"], float(info["args"]["pruning_threshold"]))]
    except (OSError, ValueError, KeyError, TypeError):
        own = [file for file in small_models if file.name.endswith(f"_{1e-6:g}.pth.tar")]
    chosen = [file for file in own if file in small_models]
    return chosen[0] if chosen else max(small_models, key=lambda file: file.stat().st_mtime)


def _write_models(path: Path, source: str, parsed: _Parsed, models: dict[str, dict[str, str]]) -> None:
    """Replace the source text of the MODELS literal, keeping every other byte of the file;
    a file without one (the original's) gets it appended."""
    newline, node = _newline_of(source), parsed.node
    if node is None:
        separator = newline if source and not source.endswith(("\n", "\r")) else ""
        new_source = f"{source}{separator}{MODELS_VARIABLE} = {_render(models, newline)}{newline}"
    else:
        start = _char_offset(source, node.lineno, node.col_offset)
        end = _char_offset(source, node.end_lineno, node.end_col_offset)
        new_source = source[:start] + _render(models, newline) + source[end:]
    reread, kept = _parse(new_source, path), {name: parsed.entries[name] for name in parsed.lines}
    if reread.models != models or {name: reread.entries[name] for name in reread.lines} != kept:
        # never write what reads back wrong
        raise UserError(f"model registry {path}: the rewritten registry would not read back; left unchanged")
    atomic_write_text(path, new_source)


def _render(models: dict[str, dict[str, str]], newline: str) -> str:
    """The MODELS literal, one field per line; every value is ``repr()`` of a plain string."""
    if not models:
        return "{}"
    lines = ["{"]
    for name, entry in models.items():
        lines.append(f"{INDENT}{name!r}: {{")
        lines.extend(f"{INDENT * 2}{field!r}: {value!r}," for field, value in entry.items())
        lines.append(f"{INDENT}}},")
    lines.append("}")
    return newline.join(lines)


def _newline_of(source: str) -> str:
    return "\r\n" if "\r\n" in source else "\n"


def _char_offset(source: str, lineno: int, byte_column: int) -> int:
    """Index in ``source`` of an ast position (1-based line, UTF-8 byte column)."""
    line_starts = [0] + [match.end() for match in re.finditer(r"\r\n|\r|\n", source)]
    line_start = line_starts[lineno - 1]
    line_end = line_starts[lineno] if lineno < len(line_starts) else len(source)
    line_bytes = source[line_start:line_end].encode("utf-8")
    return line_start + len(line_bytes[:byte_column].decode("utf-8"))


# --- command line -----------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gsparsity.registry",
        description="Register the compressed model of a finished search under NAME, so that "
                    "main_reduce_retrain_*.py --baseline_model=NAME can find it.")
    parser.add_argument("name", help="a Python identifier, e.g. pretrained_conv12_mu_0_05")
    parser.add_argument("experiment_folder", help="the search's folder (holding small_model_*.pth.tar)")
    parser.add_argument("--registry", default=str(DEFAULT_REGISTRY), metavar="FILE",
                        help="registry file to write (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an entry of the same name")
    args = parser.parse_args(argv)
    try:
        entry = register_experiment(args.name, args.experiment_folder, args.registry, args.overwrite)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)  # the exit status of every tool for a user error
    print(f"registered {entry.name!r} ({entry.arch}, {entry.scope}): {entry.small_model} in {args.registry}")


if __name__ == "__main__":
    main()
