"""``python -m moescope`` runs the command line."""

from moescope.cli.app import main

main()
