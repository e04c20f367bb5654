"""Exceptions raised on bad user input. All are picklable (plain message args)."""


class MllmclError(Exception):
    """Base class of every error the platform raises on purpose."""


class ConfigError(MllmclError, ValueError):
    """A config file or override is invalid. The message lists every problem."""

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")

    def __reduce__(self):
        return (type(self), (self.problems,))


class DataError(MllmclError, ValueError):
    """Benchmark data is missing or malformed. The message names the file and field."""


class ModelLoadError(MllmclError, ValueError):
    """A backbone could not be built or loaded."""


class StorageError(MllmclError, OSError):
    """A request to the run's storage failed after its retries (the S3 server unreachable, timing
    out or failing). The message names the operation and the URI. What a run recorded before it
    stays: the same run id resumes once the storage answers."""
