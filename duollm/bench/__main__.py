"""``python -m duollm.bench <speedup|decode|model|report> ...`` (same as ``duollm bench``)."""
import argparse
import sys

from . import add_cli, run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="duollm bench", description=__doc__)
    add_cli(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
