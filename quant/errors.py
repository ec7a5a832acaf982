"""User-facing errors. Their message is the one line the CLI and the nodes show: it names the file, tensor or layer
and says what to do. Anything else escaping the core is a bug and shows a traceback."""


class NVFP4Error(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class CheckpointError(NVFP4Error):
    """A checkpoint cannot be read, is corrupt, or cannot be written where asked."""


class PlanError(NVFP4Error):
    """A plan or a rule does not fit the model (unknown layer, regex matching nothing, wrong model)."""


class CalibrationError(NVFP4Error):
    """A calibration store or summary is corrupt, foreign, or lacks what was asked for."""


class NonFiniteTensorError(NVFP4Error):
    """A tensor holds NaN or Inf where a finite value is required."""
