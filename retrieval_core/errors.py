"""The one marker for errors a person can act on from their message alone.

A stage raises one of these (a model version that is not registered, a collection that failed its check, a
training run already going…) with a message that says what happened and what to do. ``uer`` prints that
message and exits with code 3 instead of showing a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class OperatorError(Exception):
    """Mixed into a domain error (``class ModelNotFound(OperatorError, LookupError)``): its message is the report."""


OPERATOR_EXIT_CODE = 3  # the CLI's exit code for an OperatorError (2 stays a rejected raw-data partition)
