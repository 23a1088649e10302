"""
The error the command-line scripts turn into one `prog: error: ...` line and exit status 2.
"""


class UsageError(ValueError):
    """
    A flag value or input file the scripts cannot run with; the message says which flag or file and what to pass
    instead.
    """
