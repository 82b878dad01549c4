"""Exceptions that tell the user which file, key or name is at fault."""


class WssegError(Exception):
    """Base class of every error wsseg raises on purpose."""


class ConfigError(WssegError):
    """A recipe or override is invalid. Holds every problem found, not only the first."""

    def __init__(self, problems, source=None):
        self.problems = list(problems) if not isinstance(problems, str) else [problems]
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid recipe{where}:\n{lines}")


class DataError(WssegError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


class WeightsUnavailableError(WssegError):
    """Requested pretrained weights cannot be loaded (offline, missing package or file)."""


class UnknownNameError(WssegError, KeyError):
    """A name is not in a registry; the message lists the valid names."""

    def __str__(self):  # KeyError would quote the message
        return self.args[0]
