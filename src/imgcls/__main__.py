"""``python -m imgcls`` (and ``torchrun -m imgcls``): the command line."""

import sys

from imgcls.cli import main

if __name__ == "__main__":
    sys.exit(main())
