"""``python -m lightning_soup``: the offline CLI, the same as the ``lightning-soup`` console script."""

import sys

from lightning_soup.cli import main

if __name__ == "__main__":
    sys.exit(main())
