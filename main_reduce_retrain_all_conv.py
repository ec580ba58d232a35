"""Retrain a compressed model (scope: all_conv) registered in list_of_models.py. See README.md."""
from gsparsity.launch import main
from gsparsity.retrain import retrain


def workflow(args, ctx):
    retrain(args, ctx, scope="all_conv")


if __name__ == "__main__":
    main("retrain", workflow)
