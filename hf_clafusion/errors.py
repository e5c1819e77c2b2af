"""Errors and warnings raised by hf_clafusion.

Every user-facing error is a :class:`ClaFusionError`. Messages follow one format: what is wrong,
the offending value, and how to fix it.
"""

from __future__ import annotations


class ClaFusionError(Exception):
    """Base class of every error hf_clafusion raises on bad input."""


class ConfigError(ClaFusionError, ValueError):
    """A configuration value is invalid (unknown choice, out of range, unknown key)."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class UnsupportedArchitectureError(ClaFusionError, ValueError):
    """No adapter understands the model, or the model contains a layer type the adapter cannot fuse."""

    def __init__(self, message: str, *, layer_type: str | None = None, supported: tuple[str, ...] = ()):
        super().__init__(message)
        self.layer_type = layer_type
        self.supported = supported


class IncompatibleModelsError(ClaFusionError, ValueError):
    """The models cannot be fused together (different output sizes, devices, segment structure...)."""


class InvalidWeightsError(ClaFusionError, ValueError):
    """A model's parameters contain NaN or infinite values."""


class DataError(ClaFusionError, ValueError):
    """Calibration, training or evaluation data is empty, malformed, or not in a supported form (docs/data.md)."""


class CalibrationDataError(DataError):
    """The calibration data is empty, too small, or not in a supported format."""


class AlignmentError(ClaFusionError, RuntimeError):
    """A layer-alignment request cannot be satisfied (for example an infeasible first/last constraint)."""


class TrainingDivergedError(ClaFusionError, RuntimeError):
    """Finetuning produced a non-finite loss; every process stopped at the same step."""


class SaveError(ClaFusionError, OSError):
    """Saving a model failed, the target folder is not usable, or pushing it to the Hub failed."""


class LoadError(SaveError):
    """Loading a model failed: the folder is missing or not in a known format, or a Hub id cannot be downloaded.

    A subclass of :class:`SaveError` (which load failures used to raise), so ``except SaveError`` around a load
    keeps working; catch ``LoadError`` in new code.
    """


class ClaFusionWarning(UserWarning):
    """A recoverable problem: the result is computed, but a setting should probably change."""


__all__ = [
    "AlignmentError",
    "CalibrationDataError",
    "ClaFusionError",
    "ClaFusionWarning",
    "ConfigError",
    "DataError",
    "IncompatibleModelsError",
    "InvalidWeightsError",
    "LoadError",
    "SaveError",
    "UnsupportedArchitectureError",
]
