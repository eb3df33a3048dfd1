"""What every script does around its main function: one-sentence errors for user mistakes."""

from __future__ import annotations

import sys
from collections.abc import Callable

from icrt.errors import UserError


def run(main: Callable[[], object]) -> None:
    """Call ``main``; a :class:`UserError` prints ``error: <sentence>`` and exits with 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
