"""``python -m lat COMMAND ...`` (and ``accelerate launch -m lat COMMAND ...``)."""

from lat.cli import main

main()
