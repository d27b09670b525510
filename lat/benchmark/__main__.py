"""``python -m lat.benchmark``: the benchmark command (also how case processes are started)."""

from lat.benchmark.cli import main

main()
