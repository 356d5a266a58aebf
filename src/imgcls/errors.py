"""Exceptions that carry a message meant for a person.

Every error the user can cause (a bad path, an unknown name, a value out of
range) is raised as :class:`ImgclsError` with a message that names the bad
input and what would be accepted.  The CLI prints these without a traceback.
"""


class ImgclsError(Exception):
    """An error caused by the user's input, with a message for a person."""


class ConfigError(ImgclsError, ValueError):
    """A configuration value, flag or file that cannot be accepted."""


class DataError(ImgclsError):
    """A dataset that cannot be found, read or used."""


class DownloadError(DataError):
    """An official dataset file that is missing, unreachable or corrupt."""


class CheckpointError(ImgclsError):
    """A checkpoint or run folder that cannot be read."""


class TrainingError(ImgclsError):
    """Training stopped because it could not go on (for example a NaN loss)."""


class PeerLost(TrainingError):
    """A process of a distributed job stopped because another one died or stopped answering.

    The command line exits with :attr:`exit_code` 3 rather than 2, so that a
    launcher can tell this consequence from the failure that caused it.
    """

    exit_code = 3


def unknown_name(kind: str, name: str, valid) -> ConfigError:
    """Build the error for an unknown registry name, listing the valid ones."""
    listed = ", ".join(sorted(valid))
    return ConfigError(f"unknown {kind} {name!r}; choose one of: {listed}")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the user's quota) is full: an OSError, or a library's own error
    carrying the OS's words (safetensors reports ENOSPC so)."""
    import errno

    text = str(exc)
    return (getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text
            or "os error 28" in text)
