"""Retrain a compressed model (scope: conv12) registered in list_of_models.py. See README.md."""
from functools import partial

from gsparsity.launch import main
from gsparsity.retrain import retrain

workflow = partial(retrain, scope="conv12")

if __name__ == "__main__":
    main("retrain", workflow)
