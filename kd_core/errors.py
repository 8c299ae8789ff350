"""Exceptions the engine raises; each carries a message fit to show a user."""


class KDError(Exception):
    """Base class: every engine error has a human-readable message."""


class ConfigError(KDError):
    """An experiment config is malformed (unknown key, wrong type, bad value).

    `fields` maps each bad config key ('epochs', 'codistill.replicas') to its own message, so a form
    can mark every bad field at once; the message names them all.
    """

    def __init__(self, message: str, fields: dict[str, str] | None = None):
        super().__init__(message)
        self.fields = dict(fields or {})


class DatasetError(KDError):
    """A dataset file is unreadable or malformed; the message names the problem."""


class CheckpointError(KDError):
    """A checkpoint is unreadable, unsafe, or does not fit the dataset."""


class TrainingError(KDError):
    """Training cannot go on (a NaN or infinite loss, for instance)."""


class OutOfMemory(TrainingError):
    """The device ran out of memory while training; the message names the batch size and what to try."""


class Cancelled(KDError):
    """The caller's stop signal asked the run to stop."""
