"""User-facing errors: the CLI prints each on one line and exits with code 2."""


class DPMixError(Exception):
    """Bad input or an impossible request; the message is the whole story, on one line."""


class ConfigError(DPMixError):
    """A config value, key or combination is invalid; the message names the dotted key."""


class BudgetError(DPMixError):
    """A run would exceed (or cannot be fitted into) its privacy budget; it is refused, never run."""


class DataError(DPMixError):
    """Data or a model is missing, unreadable or inconsistent (missing files, corrupt Parquet, offline hub)."""


class DivergedError(DPMixError):
    """Training produced a non-finite loss; a sweep records the trial as failed and goes on."""
