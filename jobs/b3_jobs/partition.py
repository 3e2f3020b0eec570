"""Partition stage program: communities of the rank graph (KaMinPar or METIS)."""

import sys

from b3.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("partition"))
