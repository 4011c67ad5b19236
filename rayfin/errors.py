"""The exception hierarchy. Every error rayfin raises on purpose is a :class:`RayfinError`,
whose message says what went wrong and what to do; the CLI prints it without a traceback."""


class RayfinError(Exception):
    """Base class for errors with a message meant for the user."""


class ConfigError(RayfinError, ValueError):
    """The configuration is missing or invalid."""


class BrokerError(RayfinError):
    """The embedded Kafka broker could not be started, reached or stopped."""


class ModelAssetError(RayfinError):
    """A model could not be found, prepared or loaded."""


class DatasetError(RayfinError):
    """A bundled dataset is unknown or unreadable."""
