"""Shared entry point for `python -m runners.X`: user mistakes become one line on stderr.

Exit status: 0 done; 2 bad input or a fault the message explains (`UserError`, `ConfigError`);
143 / 130 stopped by SIGTERM / SIGINT (after saving, when the runner can: `Interrupted`).
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from lib.errors import USER_ERRORS, Interrupted

EXIT_USER_ERROR = 2
EXIT_SIGINT = 130


def run(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_USER_ERROR
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = EXIT_SIGINT
    sys.exit(code or 0)
