"""``python -m duollm.bench <speedup|decode|model|report> ...`` (same as ``duollm bench``)."""
import sys


def main(argv=None) -> int:
    """``duollm bench ARGV...``: the same parser, checks and error reporting (exit 2 for a
    mistake, no traceback) as the ``duollm`` command."""
    from ..cli import main as duollm_main

    return duollm_main(["bench"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
