"""The base of every error a user can act on; the command line prints these without a traceback."""


class PipelineError(Exception):
    """Bad input, bad parameters or a missing artifact: the message says which file and what to do."""
