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

    code = "context_length_exceeded"  # OpenAI's error code, in the server's error bodies


class WorkerError(ShardllamaError):
    """A worker process died, stopped answering, or reported a failure."""

    code = "worker_failed"


class KeyFileError(ShardllamaError):
    """CurveZMQ keys are missing, malformed, or not safely this user's (owner, permissions)."""


def one_line(e: BaseException) -> str:
    """A library's exception as a short single line, for wrapping into one of our messages."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."
