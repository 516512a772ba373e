"""Summarise runs that differ only in --seed: each seed's test metric and the spread over seeds.

    python -m experiments.seeds runs/results            # folders <name>_s<seed>/results.json
    python -m experiments.seeds runs/results --metric=accuracy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bigjax.errors import ArgumentParser, run_cli
from bigjax.train.seeds import collect, seed_table


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("root", help="folder holding <name>_s<seed>/results.json run folders")
    p.add_argument("--metric", default="qwk", choices=["qwk", "accuracy", "auc"])
    a = p.parse_args(argv)
    if not collect(a.root):
        raise FileNotFoundError(f"{Path(a.root)}: no <name>_s<seed>/results.json run folders")
    print(seed_table(a.root, a.metric), end="")


if __name__ == "__main__":
    sys.exit(run_cli(main))
