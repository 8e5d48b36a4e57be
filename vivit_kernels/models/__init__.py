"""The paper's other ViViT models, beside transformers' Model 1 (``vivit_kernels.model``).

Importing this package registers them with transformers' Auto classes (``vivit_kernels.model`` imports it, so
any use of our model classes does): ``AutoModelForVideoClassification.from_pretrained`` then reads their
checkpoints.
"""

from .factorized import (
    ATTENTION_TYPES,
    FACTORIZED_PRESETS,
    VivitFactorizedConfig,
    VivitFactorizedForVideoClassification,
    VivitFactorizedModel,
    factorized_reference_forward,
    pool_tokens,
)

__all__ = ["ATTENTION_TYPES", "FACTORIZED_PRESETS", "VivitFactorizedConfig", "VivitFactorizedModel",
           "VivitFactorizedForVideoClassification", "factorized_reference_forward", "pool_tokens"]
