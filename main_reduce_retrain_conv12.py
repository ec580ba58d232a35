"""Retrain a compressed model (scope: conv12) registered in list_of_models.py. See README.md."""
from gsparsity.commands import WORKFLOWS, retrain_conv12

kind, workflow = WORKFLOWS["retrain_conv12"]

if __name__ == "__main__":
    retrain_conv12()
