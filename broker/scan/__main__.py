"""``python -m broker.scan``: the scan command without the rest of the broker CLI."""

from __future__ import annotations

import argparse
import sys

from broker.scan.cli import add_arguments, run


def main() -> int:
    parser = argparse.ArgumentParser(prog="broker scan", description="Find hardcoded secrets.")
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
