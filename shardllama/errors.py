"""User-facing errors.

Every mistake a user can make (a missing file, a bad flag, a malformed checkpoint) raises a subclass of
:class:`ShardllamaError` whose message is one line naming the thing at fault.  The CLI prints that line and
exits 1; asserts are kept for internal invariants only.
"""


class ShardllamaError(Exception):
    """Base class: the message is shown to the user as-is, without a traceback."""

    exit_code = 1


class UsageError(ShardllamaError):
    """A bad command-line flag or flag value (exit code 2, like argparse)."""

    exit_code = 2


class ModelFileError(ShardllamaError):
    """A checkpoint, params or tokenizer file is missing, truncated or malformed."""


class UnsupportedError(ShardllamaError):
    """A valid file that uses something we do not support (architecture, quant type...)."""


class PromptTooLongError(ShardllamaError):
    """The prompt (plus what must be generated) does not fit in the context window."""


class WorkerError(ShardllamaError):
    """A worker process died, stopped answering, or reported a failure."""
