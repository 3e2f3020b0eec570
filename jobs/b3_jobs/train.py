"""Train stage program, started by torchrun in every training pod (or alone, one process)."""

import sys

from b3.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("train"))
