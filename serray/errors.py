"""User-facing errors.

Everything a user can get wrong (a path, a config key, a corpus layout, an audio file) raises a
:class:`SerrayError` with a message that says what is wrong and what to do. The CLI prints these
without a traceback; any other exception is a bug and keeps its traceback.
"""


class SerrayError(Exception):
    """An error caused by user input (config, paths, data), reported without a traceback."""


class ConfigError(SerrayError):
    """The configuration is invalid: unknown key, wrong type, bad value."""


class DataError(SerrayError):
    """A data path or layout is wrong (missing corpus, not an IEMOCAP tree, no features...)."""


class AudioError(SerrayError):
    """An audio file or buffer cannot be used (unreadable, empty, non-finite, too short...)."""


class CheckpointError(DataError):
    """A checkpoint (or another file a rerun reads) is missing, truncated or not what it claims to be."""
