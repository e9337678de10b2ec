"""`python -m stratos_lite COMMAND ...`: the same as the installed `stratos-lite` command."""

from .commands import main

main()
