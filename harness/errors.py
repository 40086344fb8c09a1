"""The one exception type for bad user input (files, arguments, data)."""


class HarnessError(Exception):
    """Bad input: the CLI prints it as one line naming the file or argument, exits 2."""
