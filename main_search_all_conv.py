"""Search which filters to prune (scope: all_conv) with ProxSGD. See README.md."""
from gsparsity.commands import WORKFLOWS, search_all_conv

kind, workflow = WORKFLOWS["search_all_conv"]

if __name__ == "__main__":
    search_all_conv()
