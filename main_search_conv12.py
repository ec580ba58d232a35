"""Search which filters to prune (scope: conv12) with ProxSGD. See README.md."""
from gsparsity.commands import WORKFLOWS, search_conv12

kind, workflow = WORKFLOWS["search_conv12"]

if __name__ == "__main__":
    search_conv12()
