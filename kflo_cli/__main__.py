"""``python -m kflo_cli`` runs the CLI; :func:`main` is also the ``kflo`` console script.

This module imports nothing heavy, so Ctrl-C at any moment, also while the CLI and torch are being imported,
ends with one line and exit status 130 instead of a traceback.
"""

import sys


def main() -> None:
    """Entry point of ``kflo`` and ``python -m kflo_cli``."""
    try:
        from .cli import main as run

        run()
    except KeyboardInterrupt:
        try:
            print("interrupted (Ctrl-C)", file=sys.stderr)
        finally:
            sys.exit(130)


if __name__ == "__main__":
    main()
