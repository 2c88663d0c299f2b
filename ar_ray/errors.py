"""The one base class the CLI turns into a one-line message and exit code 2."""


class UserError(ValueError):
    """A mistake in what the user gave us (a file, key or value), not a bug in ar-ray."""


class Interrupted(Exception):
    """The user stopped the run (SIGINT/SIGTERM); checkpoints on disk let `--resume` go on."""


def first_line(error: BaseException) -> str:
    """An error's message cut to its first line (its type's name where it has none): what a
    library's multi-line message becomes inside ar-ray's one-line errors and warnings."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
