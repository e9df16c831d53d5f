"""The project's error types: an error a user can cause and fix (bad data, config, run folder, weights file, a
missing extra). The CLI prints these as one ``error: ...`` line with exit 2; anything else is a bug and keeps its
traceback."""


class Cls2detError(Exception):
    """Base of every error a user can cause and fix; its message names the culprit in one line."""


class WeightsError(Cls2detError, ValueError):
    """A weights file that cannot be read safely or does not fit the network."""


class CheckpointError(Cls2detError, ValueError):
    """A checkpoint that is missing, truncated, tampered with or does not fit the model."""
