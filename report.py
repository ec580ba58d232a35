"""Table and PNG of search / retrain experiments: kept filters, sparsity, top-1, MACs. See README.md."""
from gsparsity.report import main

if __name__ == "__main__":
    main()
