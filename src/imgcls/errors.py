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


class AccuracyDropError(ImgclsError):
    """A derived model (an int8 export) that lost more accuracy than allowed, so it was not written.

    The command line exits with :attr:`exit_code` 1, as a failed check does, rather than 2 (a bad input).
    """

    exit_code = 1


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


# Query parameters whose value is a credential, in any URL a user may give (SQLAlchemy's drivers take
# ?password=, ?sslpassword=, ?token=...; cloud stores take keys and secrets).
_SECRET_WORDS = ("pass", "pwd", "secret", "token", "key", "auth", "credential", "signature")


def url_secrets(url: str) -> list[str]:
    """The credentials written in ``url`` (a password after ``user:``, secret query values), as written and
    percent-decoded, longest first; [] for text that is not a URL."""
    from urllib.parse import parse_qsl, quote, unquote, urlsplit

    try:
        parts = urlsplit(str(url))
    except ValueError:
        return []
    found = []
    userinfo = parts.netloc.rpartition("@")[0]
    if ":" in userinfo:
        found.append(userinfo.split(":", 1)[1])
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if value and any(word in key.lower() for word in _SECRET_WORDS):
            found.append(value)
    found += [unquote(s) for s in found]
    found += [quote(s, safe="") for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def hide_secrets(text: str, url: str) -> str:
    """``text`` with every credential of ``url`` replaced by ``***`` (for messages, files and logs)."""
    for secret in url_secrets(url):
        text = text.replace(secret, "***")
    return text


def shown_url(url: str) -> str:
    """``url`` with its credentials replaced by ``***``, for messages and files."""
    return hide_secrets(str(url), url)
