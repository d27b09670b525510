"""One module per `lat` subcommand (``main(argv=None)``); ``scripts/<name>.py`` are thin wrappers around them."""
