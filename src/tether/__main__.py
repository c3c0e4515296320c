"""`python -m tether` is the `tether` command."""

from tether.cli import app

app(prog_name="tether")
