"""The one exception type that means "the user asked for something wrong".

The CLI prints a `UserError` as one line and exits with code 2 (no traceback unless `--debug`); any other
exception is a bug in qlora-kit and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: a recipe key, a path, a model or adapter that does not fit."""


class MergeCheckError(RuntimeError):
    """The merged model does not compute what the adapter on its base computes; the export is refused."""


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm; the run stopped."""
