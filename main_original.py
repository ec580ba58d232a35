"""Evaluate (--pretrained --evaluate) or train the unpruned model. See README.md."""
from gsparsity.commands import WORKFLOWS, original

kind, workflow = WORKFLOWS["original"]

if __name__ == "__main__":
    original()
