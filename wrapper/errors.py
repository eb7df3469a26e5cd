"""The exception tree.

Every error a user can cause carries three things: what failed (with the setting path or file:line),
the bad value, and the next step. The CLI turns them into one line plus an optional indented hint, and
into an exit code, through `EXIT_CODES` below: the one table that maps errors to exit codes (the classes
carry none themselves).
"""

from __future__ import annotations


class WrapperError(Exception):
    """Base class: `message` is the one line, `hint` the next step (may be empty)."""


    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(WrapperError, ValueError):
    """The registry, a profile, an env override or a command-line option is wrong (exit 2)."""



class RegistryNotFound(ConfigError, FileNotFoundError):
    """No profile registry file could be found."""


class ProfileNotFound(ConfigError, KeyError):
    """The selected profile is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class ConfigErrors(ConfigError):
    """Several configuration problems found in one pass, reported together."""

    def __init__(self, problems: list[str], source: str, hint: str = "") -> None:
        count = len(problems)
        head = f"{source}: {count} problem{'s' if count != 1 else ''}"
        super().__init__(head + "".join(f"\n  - {p}" for p in problems), hint)
        self.problems = problems


class BinaryError(ConfigError):
    """llama-server is missing or does not support a flag the settings need (exit 2)."""


class PortInUse(ConfigError):
    """A port the wrapper or llama-server needs is already taken (exit 2)."""


class ModelUnavailable(WrapperError, FileNotFoundError):
    """The model file is missing, cannot be downloaded, or failed verification (exit 3)."""



class ModelVerificationFailed(ModelUnavailable):
    """A model file's hash, size or GGUF header is wrong (exit 3)."""


class ServerFailed(WrapperError, RuntimeError):
    """llama-server failed to start or kept crashing (exit 4)."""



class PlanRefused(WrapperError):
    """The placement planner refused the configuration (exit 5)."""



class SelfCheckFailed(WrapperError):
    """`wrapper selfcheck` judged the server: fail (exit 1, like a failed test)."""


class Interrupted(WrapperError):
    """The user interrupted the command (exit 130)."""



# Ordered: the first matching class wins. The CLI uses only this table.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, 2),
    (ModelUnavailable, 3),
    (ServerFailed, 4),
    (PlanRefused, 5),
    (Interrupted, 130),
    (SelfCheckFailed, 1),
    (KeyboardInterrupt, 130),
    (WrapperError, 1),
)


def exit_code_for(exc: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1
