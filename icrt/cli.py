"""What every script does around its main function: one-sentence errors for user mistakes."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

from icrt.errors import UserError


def describe_os_error(e: OSError) -> str:
    """One sentence for an operating-system error (full disk, permissions, a file in the way)."""
    what = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        what = "no space left on the device"
    where = f" '{e.filename}'" if e.filename else ""
    if getattr(e, "filename2", None):
        where += f" -> '{e.filename2}'"
    return f"Cannot use{where}: {what}."


def run(main: Callable[[], object]) -> None:
    """Call ``main``; a :class:`UserError`, or an operating-system error such as a full disk or
    a missing permission, prints ``error: <sentence>`` and exits with 2. Anything else is a bug
    and keeps its traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
