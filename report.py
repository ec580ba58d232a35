"""Table and PNG of search / retrain experiments: kept filters, sparsity, top-1, MACs; an existing
PNG is replaced only with --force. See README.md."""
from gsparsity.report import main

if __name__ == "__main__":
    main()
