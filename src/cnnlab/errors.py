"""One exception type for every problem a user can fix: bad config, missing data, bad checkpoint.

The CLI turns it into a single line on stderr and exit code 2, never a traceback."""


class CnnlabError(Exception):
    """An error the user can act on. The message names the thing and how to fix it."""


class ConfigError(CnnlabError):
    """A config value that is unknown, of the wrong type, or out of range."""


class DataError(CnnlabError):
    """A data set that is missing, corrupt or not in the expected layout."""


class CheckpointError(CnnlabError):
    """A checkpoint that cannot be loaded into this model/config."""


class RunInterrupted(Exception):
    """Ctrl-C during a run; carries the run folder so the CLI can say how to resume."""

    def __init__(self, path):
        super().__init__(str(path))
        self.path = path


class DataMissing(DataError):
    """A data set whose files are absent (and could not be downloaded): a suite stops before any row."""
