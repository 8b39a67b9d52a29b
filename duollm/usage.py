"""User mistakes on the command line: ``UsageError`` and how ``duollm`` reports them.

Every command validates its options before any work (training, data loading, file writing)
and raises ``UsageError`` for a mistake of the user's. ``duollm.cli.main`` prints it as one or
two lines naming the option, with no traceback, and exits with status 2 (argparse's own code
for usage errors). A traceback is shown only for bugs, or for any error with ``--debug``.
"""
from __future__ import annotations

EXIT_USAGE = 2


class UsageError(Exception):
    """A user mistake on the command line. ``option`` names the flag (e.g. ``"--steps"``)."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}" if option else message)
        self.option = option
        self.message = message
