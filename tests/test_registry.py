"""gsparsity.registry: list_of_models.py read as data, rewritten safely, looked up with clear errors.

Every test works on a copy of the repository's list_of_models.py (the ``registry``
fixture of conftest.py), never on the real one.
"""
import ast
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from gsparsity.errors import UserError
from gsparsity.registry import (RegisteredModel, check_can_register, main, read_registry, register,
                                register_experiment, resolve, unregister)
from scripts import TINY, run_script

REPO = Path(__file__).resolve().parent.parent
SMALL_MODEL = "small_model_conv12_1e-06.pth.tar"
MASK = "mask_conv12_1e-06.json"
HAND_COMMENT = "# kept by hand: models of the March runs\n"
BOM = b"\xef\xbb\xbf"


def make_experiment(parent: Path, name: str = "conv12_run", scope: str = "conv12") -> Path:
    """A folder holding what a finished search leaves: a small model and its mask."""
    folder = parent / name
    folder.mkdir(parents=True)
    torch.save({"scope": scope, "arch": "resnet50", "state_dict": {}},
               folder / f"small_model_{scope}_1e-06.pth.tar")
    (folder / f"mask_{scope}_1e-06.json").write_text("{}")
    return folder


def register_run(registry: Path, name: str, folder: Path, **options) -> None:
    register(name, folder, SMALL_MODEL, MASK, "conv12", "resnet50", path=registry, **options)


def import_models(path: Path) -> dict:
    """MODELS of the file, as Python itself sees it (only ever done on a temporary copy)."""
    spec = importlib.util.spec_from_file_location("registry_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MODELS


def test_repository_registry_starts_empty_and_reads_as_data():
    assert read_registry(REPO / "list_of_models.py") == {}


def test_registered_model_resolves_to_absolute_existing_paths(registry, tmp_path):
    folder = make_experiment(tmp_path / "experiments")
    register_run(registry, "pretrained_conv12_mu_0_05", folder)
    assert resolve("pretrained_conv12_mu_0_05", registry) == RegisteredModel(
        name="pretrained_conv12_mu_0_05", experiment_dir=folder, small_model=folder / SMALL_MODEL,
        mask=folder / MASK, scope="conv12", arch="resnet50")


def test_experiment_folder_under_the_registry_folder_is_stored_relative(registry, tmp_path):
    folder = make_experiment(tmp_path / "experiments")
    register_run(registry, "run", folder)
    assert read_registry(registry)["run"] == {
        "experiment_dir": "experiments/conv12_run", "small_model": SMALL_MODEL, "mask": MASK,
        "scope": "conv12", "arch": "resnet50"}


def test_experiment_folder_elsewhere_is_stored_absolute(tmp_path):
    registry = tmp_path / "registry_home" / "list_of_models.py"
    registry.parent.mkdir()
    registry.write_text("MODELS = {}\n")
    folder = make_experiment(tmp_path / "elsewhere")
    register_run(registry, "run", folder)
    assert read_registry(registry)["run"]["experiment_dir"] == str(folder)
    assert resolve("run", registry).experiment_dir == folder


def test_relative_registry_survives_moving_the_whole_tree(registry, tmp_path):
    register_run(registry, "run", make_experiment(tmp_path / "experiments"))
    moved = tmp_path / "moved"
    moved.mkdir()
    registry.rename(moved / registry.name)
    (tmp_path / "experiments").rename(moved / "experiments")
    assert resolve("run", moved / registry.name).small_model == moved / "experiments" / "conv12_run" / SMALL_MODEL


def test_written_registry_is_python_whose_models_match_read_registry(registry, tmp_path):
    register_run(registry, "first", make_experiment(tmp_path, "a"))
    register_run(registry, "second", make_experiment(tmp_path, "b"))
    assert import_models(registry) == read_registry(registry)
    assert list(read_registry(registry)) == ["first", "second"]


def test_rewrite_keeps_the_docstring_and_hand_written_comments_byte_for_byte(registry, tmp_path):
    original = registry.read_text()
    registry.write_text(original + HAND_COMMENT)
    register_run(registry, "run", make_experiment(tmp_path))
    rewritten = registry.read_text()
    docstring = ast.get_docstring(ast.parse(original), clean=False)
    assert docstring and docstring in rewritten
    models_at = original.index("MODELS = ")
    assert rewritten.startswith(original[:models_at])  # everything above the literal, unchanged
    assert rewritten.endswith(HAND_COMMENT)


def test_text_around_the_literal_is_kept(tmp_path):
    registry = tmp_path / "list_of_models.py"
    before, after = "'Notes.'  # users' own\r\nold = 'conv12_old'\r\n", "  # trailing note\r\nlater = 'x'\r\n"
    registry.write_bytes(f"{before}MODELS: dict = {{\r\n    # old note\r\n}}{after}".encode())
    register_run(registry, "run", make_experiment(tmp_path))
    rewritten = registry.read_bytes().decode()
    assert rewritten.startswith(before + "MODELS: dict = {")
    assert rewritten.endswith("}" + after)
    assert "\n" not in rewritten.replace("\r\n", "")  # keeps the file's CRLF line ends
    assert read_registry(registry)["run"]["scope"] == "conv12"
    assert list(read_registry(registry)) == ["old", "run", "later"]  # the original's lines, in file order


def test_non_ascii_text_before_the_literal_is_kept(tmp_path):
    registry = tmp_path / "list_of_models.py"
    registry.write_text('"Modèle réduit: ½ filters"; MODELS = {}\n', encoding="utf-8")
    register_run(registry, "run", make_experiment(tmp_path))
    assert registry.read_text(encoding="utf-8").startswith('"Modèle réduit: ½ filters"; MODELS = {\n')
    assert list(read_registry(registry)) == ["run"]


def test_hand_edited_entries_with_comments_and_odd_formatting_are_read(tmp_path):
    registry = tmp_path / "list_of_models.py"
    registry.write_text('"""Mine."""\nMODELS = {  # mine\n  "a" : {"scope":"conv12",   # note\n'
                        '"arch": \'resnet18\'},\n}\n')
    assert read_registry(registry) == {"a": {"scope": "conv12", "arch": "resnet18"}}


def test_registry_saved_with_a_bom_is_read_and_rewritten_as_plain_utf8_keeping_its_text(tmp_path):
    registry = tmp_path / "list_of_models.py"
    before, after = '"""Modèles réduits."""\nMODELS = ', "\n" + HAND_COMMENT
    registry.write_bytes(BOM + f"{before}{{'old': {{'scope': 'conv12'}}}}{after}".encode())
    assert read_registry(registry) == {"old": {"scope": "conv12"}}
    register_run(registry, "run", make_experiment(tmp_path))
    rewritten = registry.read_bytes()
    assert not rewritten.startswith(BOM)
    assert rewritten.decode("utf-8").startswith(before + "{") and rewritten.decode("utf-8").endswith("}" + after)
    assert list(read_registry(registry)) == ["old", "run"]


def test_registering_through_a_symlinked_registry_updates_the_shared_file(tmp_path, capsys):
    shared = tmp_path / "shared" / "list_of_models.py"
    shared.parent.mkdir()
    shared.write_text("MODELS = {}\n")
    link = tmp_path / "repo" / "list_of_models.py"
    link.parent.mkdir()
    link.symlink_to(shared)
    folder = make_experiment(tmp_path / "repo" / "experiments")
    main(["run", str(folder), "--registry", str(link)])
    assert "registered 'run'" in capsys.readouterr().out
    assert link.is_symlink()
    # Everyone who opens the shared file finds the model, not only those who go through the link.
    assert resolve("run", shared).experiment_dir == resolve("run", link).experiment_dir == folder


def test_registering_after_unregistering_leaves_an_empty_literal(registry, tmp_path):
    register_run(registry, "run", make_experiment(tmp_path))
    unregister("run", registry)
    assert read_registry(registry) == {}
    assert "MODELS = {}" in registry.read_text()


# --- refusals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["1abc", "a-b", "class", "x; import os", "a\nb", ""])
def test_invalid_names_are_refused_and_the_file_untouched(registry, tmp_path, name):
    folder = make_experiment(tmp_path)
    before = registry.read_bytes()
    with pytest.raises(UserError, match="Python identifier"):
        register_run(registry, name, folder)
    assert registry.read_bytes() == before


@pytest.mark.parametrize("field", ["small_model", "mask", "experiment_dir"])
def test_paths_with_line_breaks_are_refused(registry, tmp_path, field):
    folder = make_experiment(tmp_path)
    paths = {"experiment_dir": str(folder), "small_model": SMALL_MODEL, "mask": MASK}
    paths[field] += "\nimport os"
    with pytest.raises(UserError, match="line breaks are not allowed"):
        register("run", paths["experiment_dir"], paths["small_model"], paths["mask"], "conv12", "resnet50",
                 path=registry)


def test_quote_tricks_in_paths_stay_plain_data_and_never_run(registry, tmp_path, capfd):
    trick = '", "x": __import__("os").system("echo INJECTED")#'
    folder = make_experiment(tmp_path, trick)
    small_model = folder / f"{trick}.pth.tar"
    small_model.write_bytes(b"")
    register("run", folder, small_model.name, MASK, "conv12", "resnet50", path=registry)
    models = import_models(registry)  # Python runs the rewritten file: nothing must execute
    assert "INJECTED" not in capfd.readouterr().out
    assert models == read_registry(registry)
    assert set(models) == {"run"}
    assert models["run"]["small_model"] == small_model.name


def test_invalid_scope_and_arch_are_refused(registry, tmp_path):
    folder = make_experiment(tmp_path)
    with pytest.raises(UserError, match="scope must be one of conv12, all_conv"):
        register("run", folder, SMALL_MODEL, MASK, "conv3", "resnet50", path=registry)
    with pytest.raises(UserError, match="arch must be an identifier"):
        register("run", folder, SMALL_MODEL, MASK, "conv12", "resnet50()", path=registry)


def test_missing_experiment_folder_or_file_is_refused_at_registration(registry, tmp_path):
    folder = make_experiment(tmp_path)
    with pytest.raises(UserError, match="no such folder"):
        register_run(registry, "run", tmp_path / "absent")
    with pytest.raises(UserError, match="no_mask.json: no such file"):
        register("run", folder, SMALL_MODEL, "no_mask.json", "conv12", "resnet50", path=registry)


def test_files_outside_the_experiment_folder_are_refused(registry, tmp_path):
    folder = make_experiment(tmp_path)
    other = make_experiment(tmp_path, "other")
    with pytest.raises(UserError, match="must lie in the experiment folder"):
        register("run", folder, f"../{other.name}/{SMALL_MODEL}", MASK, "conv12", "resnet50", path=registry)


def test_existing_name_is_refused_then_replaced_with_overwrite(registry, tmp_path):
    first, second = make_experiment(tmp_path, "first"), make_experiment(tmp_path, "second")
    register_run(registry, "run", first)
    with pytest.raises(UserError, match="already has 'run' \\(experiment_dir 'first'\\)"):
        register_run(registry, "run", second)
    assert resolve("run", registry).experiment_dir == first
    register_run(registry, "run", second, overwrite=True)
    assert resolve("run", registry).experiment_dir == second
    assert list(read_registry(registry)) == ["run"]


def test_unknown_name_lists_the_known_names(registry, tmp_path):
    register_run(registry, "beta", make_experiment(tmp_path, "b"))
    register_run(registry, "alpha", make_experiment(tmp_path, "a"))
    with pytest.raises(UserError, match="no model 'gamma' .*; known: alpha, beta"):
        resolve("gamma", registry)


def test_unknown_name_in_an_empty_registry_says_how_to_add_one(registry):
    with pytest.raises(UserError, match="is empty; add one with main_search_\\*.py --register NAME"):
        resolve("anything", registry)


def test_deleted_experiment_folder_is_reported_at_lookup(registry, tmp_path):
    folder = make_experiment(tmp_path)
    register_run(registry, "run", folder)
    for file in folder.iterdir():
        file.unlink()
    folder.rmdir()
    with pytest.raises(UserError, match=f"experiment folder {folder} is gone"):
        resolve("run", registry)


def test_deleted_small_model_is_reported_at_lookup(registry, tmp_path):
    folder = make_experiment(tmp_path)
    register_run(registry, "run", folder)
    (folder / SMALL_MODEL).unlink()
    with pytest.raises(UserError, match=f"small model {folder / SMALL_MODEL} is gone"):
        resolve("run", registry)


def test_registry_with_a_syntax_error_is_a_user_error(tmp_path):
    registry = tmp_path / "list_of_models.py"
    registry.write_text("MODELS = {\n    'a': {\n")
    with pytest.raises(UserError, match="syntax error on line"):
        read_registry(registry)


def test_missing_registry_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_registry(tmp_path / "list_of_models.py")


@pytest.mark.parametrize("source, problem", [
    ("X = {}\n", r"line 1 \('X = \{\}'\) is neither a line name = 'folder' nor the MODELS = \{...\} literal"),
    ("import os\nMODELS = {}\n", r"line 1 \('import os'\) is neither"),
    ("MODELS = {}\nY = [MODELS]\n", r"line 2 \('Y = \[MODELS\]'\) is neither"),
    ("MODELS = dict(a={})\n", "must be a literal dict"),
    ("MODELS = __import__('os').system('echo INJECTED')\n", "must be a literal dict"),
    ("MODELS = []\n", "is a list, not a dict"),
    ("MODELS = {}\nMODELS = {}\n", "assigned 2 times"),
    ("MODELS = {'a': {'scope': 12}}\n", "must be a string"),
    # the original's lines name = 'folder': only that form, each name once
    ("run = 'folder'\nrun = 'other'\n", "'run' is assigned on lines 1 and 2; keep one"),
    ("run = 'folder'\nMODELS = {'run': {}}\n", r"'run' is both an entry of MODELS and a line of its own \(line 1\)"),
    ("run = 'a' + 'b'\n", r"line 1 \(\"run = 'a' \+ 'b'\"\) is neither"),
    ("run = base + '/x'\n", "line 1 "),
    ("run: str = 'folder'\n", "line 1 "),
    ("a = b = 'folder'\n", "line 1 "),
    ("\n\nrun = f'{__import__(\"os\").system(\"echo INJECTED\")}'\n", "line 3 "),
])
def test_registry_that_is_not_one_literal_dict_of_strings_and_name_lines_is_refused(tmp_path, capfd, source, problem):
    registry = tmp_path / "list_of_models.py"
    registry.write_text(source)
    with pytest.raises(UserError, match=problem):
        read_registry(registry)
    assert "INJECTED" not in capfd.readouterr().out


def test_check_can_register_refuses_a_taken_name_and_accepts_a_free_one(registry, tmp_path):
    register_run(registry, "run", make_experiment(tmp_path))
    before = registry.read_bytes()
    with pytest.raises(UserError, match="already has 'run'"):
        check_can_register("run", registry)
    check_can_register("other", registry)
    check_can_register("run", registry, overwrite=True)
    assert registry.read_bytes() == before  # a check only: nothing written


@pytest.mark.parametrize("read_only", ["file", "folder"])
def test_check_can_register_refuses_a_registry_it_could_not_rewrite(registry, monkeypatch, read_only):
    import gsparsity.registry as registry_module

    locked = registry.resolve() if read_only == "file" else registry.resolve().parent
    writable = registry_module.os.access
    monkeypatch.setattr(registry_module.os, "access",  # tests run as root, which chmod does not stop
                        lambda path, mode: writable(path, mode) and not (Path(path) == locked and mode == os.W_OK))
    with pytest.raises(UserError, match="cannot write to it or to its folder"):
        check_can_register("run", registry)


@pytest.mark.parametrize("name, registry_text, problem", [
    ("class", "MODELS = {}\n", "Python identifier"),
    ("run", None, "no such file"),
    ("run", "MODELS = {\n", "syntax error on line"),
])
def test_check_can_register_refuses_what_register_would(tmp_path, name, registry_text, problem):
    registry = tmp_path / "list_of_models.py"
    if registry_text is not None:
        registry.write_text(registry_text)
    with pytest.raises(UserError, match=problem):
        check_can_register(name, registry)


# --- a search given --register NAME ---------------------------------------------------------------

def search_refused(registry: Path, tmp_path: Path, *flags: str) -> str:
    """Run a search that registers as 'run' and must stop at once; its stderr.

    With a cache of its own, no demo digits written is the proof that no data was loaded."""
    cache = tmp_path / "fresh_cache"
    result = run_script("main_search_conv12.py", *flags, "--register", "run", "--registry", str(registry),
                        expect=2, GSPARSITY_CACHE=str(cache))
    assert not cache.exists()
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.parametrize("problem", ["name taken", "no registry file", "registry syntax error"])
@pytest.mark.slow
def test_search_whose_name_the_registry_cannot_take_stops_before_loading_data_or_making_a_folder(
        registry, tmp_path, problem):
    if problem == "name taken":
        register_run(registry, "run", make_experiment(tmp_path))
    elif problem == "no registry file":
        registry.unlink()
    else:
        registry.write_text("MODELS = {\n")
    before = registry.read_bytes() if registry.exists() else None
    experiments = tmp_path / "experiments"
    error = search_refused(registry, tmp_path, *TINY, "--path_to_save", str(experiments))
    expected = {"name taken": "already has 'run'", "no registry file": "no such file",
                "registry syntax error": "syntax error on line"}[problem]
    assert error.startswith("main_search_conv12.py: error: --register run: model registry") and expected in error
    assert not experiments.exists()
    assert (registry.read_bytes() if registry.exists() else None) == before


@pytest.mark.slow
def test_resumed_search_whose_name_is_taken_stops_before_touching_its_folder(registry, tmp_path):
    register_run(registry, "run", make_experiment(tmp_path))
    folder = tmp_path / "conv12_search"
    folder.mkdir()
    (folder / "run_info.json").write_text(json.dumps({"script": "main_search_conv12.py",
                                                      "args": {"data": "demo", "subset": 32}}))
    error = search_refused(registry, tmp_path, "--resume", str(folder))
    assert "already has 'run'" in error
    assert os.listdir(folder) == ["run_info.json"]


@pytest.mark.slow
def test_a_search_that_registered_itself_resumes_and_keeps_its_name(registry, tmp_path):
    flags = [*TINY, "--register", "grown", "--registry", str(registry)]
    run_script("main_search_conv12.py", *flags, "--path_to_save", str(tmp_path))
    folder = next(tmp_path.glob("conv12_*"))
    resumed = run_script("main_search_conv12.py", "--resume", str(folder), "--epochs", "2")
    assert "epoch 1 done" in resumed.stdout and f"registered {folder} as 'grown'" in resumed.stdout
    assert read_registry(registry)["grown"]["experiment_dir"] == folder.name  # the same entry, brought up to date


# --- registering a finished experiment ------------------------------------------------------------

def test_register_experiment_finds_the_files_and_reads_scope_and_arch(registry, tmp_path):
    folder = make_experiment(tmp_path, scope="all_conv")
    entry = register_experiment("run", folder, registry)
    assert (entry.scope, entry.arch) == ("all_conv", "resnet50")
    assert entry.small_model == folder / "small_model_all_conv_1e-06.pth.tar"
    assert entry.mask == folder / "mask_all_conv_1e-06.json"


def test_register_experiment_without_a_small_model_is_refused(registry, tmp_path):
    with pytest.raises(UserError, match="holds no small_model_"):
        register_experiment("run", tmp_path, registry)


def test_command_line_registers_and_reports_errors_in_one_line(registry, tmp_path, capsys):
    folder = make_experiment(tmp_path)
    argv = ["run", str(folder), "--registry", str(registry)]
    main(argv)
    assert "registered 'run'" in capsys.readouterr().out
    assert resolve("run", registry).experiment_dir == folder
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "already has 'run'" in error and error.count("\n") == 1
