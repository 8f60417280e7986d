"""The command line's user error, shared by ``stage1_core.cli`` and the subcommand modules it registers."""


class CliError(ValueError):
    """A user error: printed without a traceback, exit status 2."""
