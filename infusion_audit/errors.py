"""Errors that reach the user as one line and exit code 2, never as a traceback."""


class UserError(Exception):
    """A problem with what the user gave us (a config, a file, an argument)."""


class ConfigError(UserError):
    """A config file that does not match the schema: names the file, the key and what was expected."""

    def __init__(self, source: str, key: str, expected: str, got: object = None):
        where = f"{source}: {key}" if key else source
        msg = f"{where}: expected {expected}"
        if got is not None:
            msg += f", got {got!r}"
        super().__init__(msg)


class DataError(UserError):
    """A dataset or checkpoint that cannot be used: wrong shape, NaNs, hostile content."""


class PluginError(UserError):
    """A plugin that is unknown, duplicated or fails to import."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's message as one line of an error or a report (its type's name where the message is empty):
    third-party messages can run to pages."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]
