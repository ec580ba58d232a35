"""Search which filters to prune (scope: conv12) with ProxSGD. See README.md."""
from functools import partial

from gsparsity.launch import main
from gsparsity.search import search

workflow = partial(search, scope="conv12")

if __name__ == "__main__":
    main("search", workflow)
