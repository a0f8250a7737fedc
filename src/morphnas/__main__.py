"""``python -m morphnas``: the CLI, as ``torchrun -m morphnas search ...`` starts it.

Under torchrun only rank 0 prints results on stdout (the other ranks' tables would repeat it,
empty); every rank keeps stderr, where errors go.
"""

import os
import sys

from morphnas.cli import main

if __name__ == "__main__":
    if os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - held for the process's lifetime
    sys.exit(main())
