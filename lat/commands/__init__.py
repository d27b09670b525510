"""One module per command (``main(argv=None)``); ``scripts/<name>.py`` are thin wrappers around them."""
