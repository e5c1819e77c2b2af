"""hf_clafusion: fuse trained neural networks of different depths and widths.

Cross-layer alignment + optimal-transport fusion (CLAFusion, Nguyen et al., ICASSP 2023), for plain PyTorch
models, with Accelerate finetuning and Hub-ready saving.

Example:
    ```py
    from hf_clafusion import fuse_pretrained, FusionConfig

    result = fuse_pretrained([deep_model, shallow_model], data=calibration_inputs)
    print(result.summary())
    ```
"""

__version__ = "0.1.0"

from .adapters import list_adapters, register_adapter
from .api import fuse_pretrained
from .config import FinetuneConfig, FusionConfig
from .errors import (
    AlignmentError,
    CalibrationDataError,
    ClaFusionError,
    ClaFusionWarning,
    ConfigError,
    DataError,
    IncompatibleModelsError,
    InvalidWeightsError,
    LoadError,
    SaveError,
    TrainingDivergedError,
    UnsupportedArchitectureError,
)
from .evaluation import EvaluationReport, evaluate
from .finetune import FinetuneResult, finetune
from .fusion import align, fuse
from .hub import load_pretrained, save_model
from .result import AlignmentPreview, FusionResult


__all__ = [
    "AlignmentError",
    "AlignmentPreview",
    "CalibrationDataError",
    "ClaFusionError",
    "ClaFusionWarning",
    "ConfigError",
    "DataError",
    "EvaluationReport",
    "FinetuneConfig",
    "FinetuneResult",
    "FusionConfig",
    "FusionResult",
    "IncompatibleModelsError",
    "InvalidWeightsError",
    "LoadError",
    "SaveError",
    "TrainingDivergedError",
    "UnsupportedArchitectureError",
    "__version__",
    "align",
    "evaluate",
    "finetune",
    "fuse",
    "fuse_pretrained",
    "list_adapters",
    "load_pretrained",
    "register_adapter",
    "save_model",
]
