"""The paper's other ViViT models, beside transformers' Model 1 (``vivit_kernels.model``).

Importing this package registers them with transformers' Auto classes (``vivit_kernels.model`` imports it, so
any use of our model classes does): ``AutoModelForVideoClassification.from_pretrained`` then reads their
checkpoints.
"""

from .factorized import (
    VivitFactorizedConfig,
    VivitFactorizedForVideoClassification,
    VivitFactorizedModel,
    factorized_reference_forward,
    pool_tokens,
)

__all__ = ["VivitFactorizedConfig", "VivitFactorizedModel",
           "VivitFactorizedForVideoClassification", "factorized_reference_forward", "pool_tokens"]
