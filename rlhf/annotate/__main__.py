"""`python -m rlhf.annotate ARGS...` behaves like `rlhf annotate ARGS...`."""

import sys

from rlhf.annotate.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
