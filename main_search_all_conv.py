"""Search which filters to prune (scope: all_conv) with ProxSGD. See README.md."""
from gsparsity.launch import main
from gsparsity.search import search


def workflow(args, ctx):
    search(args, ctx, scope="all_conv")


if __name__ == "__main__":
    main("search", workflow)
