"""The one exception type that the CLI turns into a one-line error message."""


class DeltatlError(Exception):
    """A problem with the user's input (data, model name, checkpoint, run directory...).

    The CLI prints ``deltatl: error: <message>`` and exits with status 2, without a traceback.
    Library callers get an ordinary exception.
    """
