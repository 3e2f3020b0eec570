"""Rank stage program: teacher embeddings and top p+m positives per query."""

import sys

from b3.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("rank"))
