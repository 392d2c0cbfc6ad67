"""``python -m captioning``: the command line (see ``captioning.cli``)."""

import sys

from captioning.cli import main

if __name__ == "__main__":
    sys.exit(main())
