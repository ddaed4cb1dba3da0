"""What the command line does with an error: the types that end a command with one line instead of a traceback.

The CLI prints a `UserError` as one line and exits with code 2 (no traceback unless `--debug`); a `Failed`
(qlora-kit checked a result and it is wrong) as one line with code 1; any other exception is a bug in
qlora-kit and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: a recipe key, a path, a model or adapter that does not fit."""


class Failed(RuntimeError):
    """A result that qlora-kit checked and found wrong: not the user's typo, not a crash."""


class MergeCheckError(Failed):
    """The merged model does not compute what the adapter on its base computes; the export is refused."""


class TrainingDiverged(Failed):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm; the run stopped."""
