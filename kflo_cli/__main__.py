"""``python -m kflo_cli`` runs the CLI."""

from .cli import main

main()
