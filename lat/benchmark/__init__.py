"""Throughput, FLOP and memory measurements of both stages: ``python -m lat.benchmark --help``.

``cli`` holds the command line and its help text, ``harness`` the shared measuring code,
and one module per ``--what`` the cases.
"""
