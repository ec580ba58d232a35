"""Evaluate (--pretrained --evaluate) or train the unpruned model. See README.md."""
from gsparsity.launch import main
from gsparsity.original import original

if __name__ == "__main__":
    main("original", original)
