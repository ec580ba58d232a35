"""Retrain a compressed model (scope: conv12) registered in list_of_models.py. See README.md."""
from gsparsity.launch import main
from gsparsity.retrain import retrain


def workflow(args, ctx):
    retrain(args, ctx, scope="conv12")


if __name__ == "__main__":
    main("retrain", workflow)
