"""The installed commands (``pyproject.toml``): each does what its ``main_*.py`` script does.

``gsparsity-search-conv12`` is ``python main_search_conv12.py``, and so on; the scripts stay,
under the original's names, for users who run them from a clone.
"""
from __future__ import annotations

from functools import partial

from .launch import main
from .original import original as original_workflow
from .retrain import retrain
from .search import search

# What each script runs (a partial, not a lambda: spawned processes pickle it).
WORKFLOWS = {
    "search_conv12": ("search", partial(search, scope="conv12")),
    "search_all_conv": ("search", partial(search, scope="all_conv")),
    "retrain_conv12": ("retrain", partial(retrain, scope="conv12")),
    "retrain_all_conv": ("retrain", partial(retrain, scope="all_conv")),
    "original": ("original", original_workflow),
}


def search_conv12() -> None:
    main(*WORKFLOWS["search_conv12"])


def search_all_conv() -> None:
    main(*WORKFLOWS["search_all_conv"])


def retrain_conv12() -> None:
    main(*WORKFLOWS["retrain_conv12"])


def retrain_all_conv() -> None:
    main(*WORKFLOWS["retrain_all_conv"])


def original() -> None:
    main(*WORKFLOWS["original"])
