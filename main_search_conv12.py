"""Search which filters to prune (scope: conv12) with ProxSGD. See README.md."""
from gsparsity.launch import main
from gsparsity.search import search


def workflow(args, ctx):
    search(args, ctx, scope="conv12")


if __name__ == "__main__":
    main("search", workflow)
