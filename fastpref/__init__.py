"""fastpref: fused kernels for diffusion preference-optimisation losses.

>>> loss = fastpref.dmpo_loss(model_pred, ref_pred, target)          # (2B, *S): winners, then losers
"""

from fastpref.losses import (
    clip_pair_weights,
    dmpo_loss,
    dpo_loss,
    dro_loss,
    kto_loss,
    mapo_loss,
    orpo_loss,
    rpo_loss,
)
from fastpref.stats import KTOStats, PreferenceStats, implicit_accuracy

__version__ = "0.1.0"

__all__ = ["dpo_loss", "dmpo_loss", "PreferenceStats", "implicit_accuracy", "__version__"]
__all__ += ["mapo_loss", "orpo_loss", "kto_loss", "dro_loss", "clip_pair_weights", "rpo_loss", "KTOStats"]
