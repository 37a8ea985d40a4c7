"""Errors the CLI turns into one `error:` line and a documented exit code."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_LOCAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class CliError(Exception):
    """An error with its exit code; the message is printed as `error: <message>`."""

    code = EXIT_USAGE


class UsageError(CliError):
    code = EXIT_USAGE


class Unreachable(CliError):
    """The broker or the result backend cannot be reached, or lost the job."""

    code = EXIT_UNREACHABLE


class LocalFailure(CliError):
    """Local mode's embedded server or worker failed to start or died."""

    code = EXIT_LOCAL
