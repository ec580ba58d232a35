"""Search which filters to prune (scope: all_conv) with ProxSGD. See README.md."""
from functools import partial

from gsparsity.launch import main
from gsparsity.search import search

workflow = partial(search, scope="all_conv")

if __name__ == "__main__":
    main("search", workflow)
