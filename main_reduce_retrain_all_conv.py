"""Retrain a compressed model (scope: all_conv) registered in list_of_models.py. See README.md."""
from gsparsity.commands import WORKFLOWS, retrain_all_conv

kind, workflow = WORKFLOWS["retrain_all_conv"]

if __name__ == "__main__":
    retrain_all_conv()
