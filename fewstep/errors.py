"""User-facing errors that any stage may raise, each phrased as one line. Kept apart from the code that
raises them so that stage start-up (fewstep.core.runtime) imports no data or training code."""


class DataError(ValueError):
    """A data source the user pointed at cannot be used, phrased as one line."""


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite."""
