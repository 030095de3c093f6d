"""`python -m app.cli ...`: the `spafit` command."""

from . import main

main()
