"""``python -m optimus_ckpt``: the ``optimus-ckpt`` command line (see :mod:`optimus_ckpt.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
