"""Errors the CLI turns into one `error:` line and a documented exit code."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class CliError(Exception):
    """An error with its exit code; the message is printed as `error: <message>`."""

    code = EXIT_USAGE


class UsageError(CliError):
    code = EXIT_USAGE


class Unreachable(CliError):
    code = EXIT_UNREACHABLE
