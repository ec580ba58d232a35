"""Retrain a compressed model (scope: all_conv) registered in list_of_models.py. See README.md."""
from functools import partial

from gsparsity.launch import main
from gsparsity.retrain import retrain

workflow = partial(retrain, scope="all_conv")

if __name__ == "__main__":
    main("retrain", workflow)
