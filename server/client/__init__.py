"""The command line's clients of a running gateway: ``tail`` and ``health``."""
