"""One exception type per user-facing failure class. The CLI prints these without a traceback."""


class MtpTuneError(Exception):
    """Base class: a failure the user can fix; the message names the culprit and a hint."""


class CheckpointError(MtpTuneError):
    """A checkpoint (verifier, converted head, training checkpoint) is missing, malformed or incompatible."""


class FamilyError(CheckpointError):
    """The model family is not supported or its config is inconsistent."""


class DataError(MtpTuneError):
    """Training or evaluation data is malformed."""


class ServerError(MtpTuneError):
    """A hidden-state or generation server misbehaved or could not be reached."""


class ConfigError(MtpTuneError):
    """Conflicting or invalid flags / configuration."""
