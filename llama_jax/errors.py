"""The one user-error type of the project.

Every problem a user can fix (a flag, a config key, a file, a request) is raised as a `UserError` whose message is one
line naming what is wrong and what was expected. The command-line tools print it as "error: <message>" and exit 2;
anything else that escapes them is a bug and ends in a traceback and exit 1. The specific classes
(`ConfigError`, `DataError`, `CheckpointError`, ...) keep their ValueError / RuntimeError bases for library callers.
"""


class UserError(Exception):
    """Bad input that the user can fix; the message is one line naming the flag, key or file (exit code 2)."""


class ArgumentError(ValueError, UserError):
    """An argument of a library function out of its range (a sampling setting, a prompt, a request field). `param`
    names it, so a caller (the server, a command) can point at its own flag or field without parsing the text."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
