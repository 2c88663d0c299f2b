"""The one base class the CLI turns into a one-line message and exit code 2."""


class UserError(ValueError):
    """A mistake in what the user gave us (a file, key or value), not a bug in ar-ray."""


class Interrupted(Exception):
    """The user stopped the run (SIGINT/SIGTERM); checkpoints on disk let `--resume` go on."""
