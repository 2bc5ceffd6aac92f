"""Shared entry point for `python -m runners.X`: user mistakes become one line on stderr."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from lib.errors import USER_ERRORS


def run(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)
