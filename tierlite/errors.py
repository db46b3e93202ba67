"""Errors that reach a user as one clear line (the CLI prints `error: <message>`)."""


class TierliteError(Exception):
    """Base class: its message is complete and fit to print on its own."""


class ConfigError(TierliteError):
    """A local config (YAML, CLI option) is invalid. Raised once, at start-up."""


class BundleError(TierliteError):
    """A model bundle is missing, malformed, tampered with or incompatible."""


class DataError(TierliteError):
    """An image folder or frame source cannot be used."""


class RuntimeUnavailable(TierliteError):
    """A runtime plugin's library or delegate is not installed here."""


class WireError(TierliteError):
    """A wire message failed to decode. Workers count and drop these, they never crash."""


class UpdateError(TierliteError):
    """A model update was refused or could not be published; the message says why in one line."""
