"""User-facing errors: the CLI prints their message as one line, without a traceback."""


class LggError(Exception):
    """A mistake the user can fix (bad input, missing file, wrong option). The message says what and how."""

    exit_code = 2


class DataError(LggError):
    """The data folder, a TIFF in it, or a split file is not what the kaggle_3m layout requires."""


class CheckpointError(LggError):
    """A checkpoint is missing, corrupt, or not an lggdeploy checkpoint."""


class ModelError(LggError):
    """An unknown preset / architecture / encoder, or encoder weights that cannot be had."""


class EngineError(LggError):
    """An engine or its manifest is missing, mismatched with this machine, or failed a check."""


class BackendUnavailable(LggError):
    """A backend (TensorRT, a GPU) is not usable on this machine; the message says why."""


class GateFailed(LggError):
    """An engine lost more accuracy than the budget allows and no fallback met it. `gate`: the gate's record (per-patient
    rows, failures) when one was reached, so that a caller can keep it although no engine was written."""

    exit_code = 3

    def __init__(self, message: str, gate: dict | None = None):
        super().__init__(message)
        self.gate = gate


class SearchStopped(GateFailed):
    """The time budget ran out while an engine was still failing its gate (before the next fallback rebuild or QAT)."""


class CannotWin(GateFailed):
    """An INT8 engine failed its gate fully quantized, and even so it was clearly slower (optimize.PROBE_MARGIN) than an
    engine that had already passed: the search that could make it pass (nodes kept in float, QAT) only adds float work,
    so it was not run (`optimize`'s speed probe)."""
