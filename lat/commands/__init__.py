"""The ``lat`` commands: one module per command, each exposing ``main(argv=None)``."""
