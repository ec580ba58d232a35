"""pip install . gives the gsparsity package, proxsgd and the gsparsity-* commands, which work
from any folder and read the working folder's registry."""
import os
import subprocess
import sys

import pytest
from scripts import REPO

COMMANDS = ("gsparsity-search-conv12", "gsparsity-search-all-conv", "gsparsity-retrain-conv12",
            "gsparsity-retrain-all-conv", "gsparsity-original", "gsparsity-registry", "gsparsity-export",
            "gsparsity-report")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project's wheel installed into a folder of its own (its dependencies are this venv's)."""
    root = tmp_path_factory.mktemp("installed")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
                    "-w", str(root / "wheel"), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next((root / "wheel").glob("gsparsity-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q",
                    "--target", str(root / "site"), str(wheel)], check=True, capture_output=True, timeout=300)
    work = root / "work"  # a user's folder, outside the repository
    work.mkdir()
    return root / "site", work


def run_installed(installed, command, *flags, **env_extra):
    site, work = installed
    inherited = {name: value for name, value in os.environ.items() if name != "GSPARSITY_REGISTRY"}
    env = {**inherited, "PYTHONPATH": str(site), **env_extra}
    return subprocess.run([str(site / "bin" / command), *flags], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_the_wheel_holds_the_package_proxsgd_and_every_command(installed):
    site, work = installed
    found = subprocess.run([sys.executable, "-c", "import gsparsity, proxsgd; print(gsparsity.__file__, "
                            "proxsgd.__file__)"], cwd=work, env={**os.environ, "PYTHONPATH": str(site)},
                           capture_output=True, text=True, check=True).stdout.split()
    assert all(path.startswith(str(site)) for path in found), found  # not the repository's copies
    for command in COMMANDS:
        result = run_installed(installed, command, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout, (command, result.stderr)


@pytest.mark.slow
def test_an_installed_command_reads_the_working_folders_registry_or_the_one_the_environment_names(installed):
    site, work = installed
    (work / "list_of_models.py").write_text("MODELS = {}\n")
    flags = ("--data", "demo", "--baseline_model", "nosuch", "-j", "0")
    result = run_installed(installed, "gsparsity-retrain-conv12", *flags)
    assert result.returncode == 2
    assert "gsparsity-retrain-conv12: error: no model 'nosuch': the model registry list_of_models.py is empty" \
        in result.stderr
    named = work / "elsewhere.py"
    named.write_text("MODELS = {}\n")
    result = run_installed(installed, "gsparsity-retrain-conv12", *flags, GSPARSITY_REGISTRY=str(named))
    assert result.returncode == 2 and f"the model registry {named} is empty" in result.stderr
