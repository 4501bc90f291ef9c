"""fastpref: fused kernels for diffusion preference-optimisation losses.

>>> loss = fastpref.dmpo_loss(model_pred, ref_pred, target)          # (2B, *S): winners, then losers
"""

from fastpref.losses import dmpo_loss, dpo_loss
from fastpref.stats import PreferenceStats, implicit_accuracy

__version__ = "0.1.0"

__all__ = ["dpo_loss", "dmpo_loss", "PreferenceStats", "implicit_accuracy", "__version__"]
