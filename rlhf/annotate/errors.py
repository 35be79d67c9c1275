"""The one exception type that the CLI turns into a plain message instead of a traceback."""


class AnnotateError(Exception):
    """A problem the user can fix (bad input file, bad database URL, unknown user...)."""
