"""Block distillation: train a full-attention model to answer well under block attention (TRL-based).

Public API: :class:`BlockDistillationConfig`, :class:`BlockDistillationTrainer`,
:class:`BlockFinetuneTrainer` (Ma et al. baseline), data helpers in :mod:`.data`, loss terms in
:mod:`.losses`, masks in :mod:`.masks`, sink-token helpers in :mod:`.sinks`.
"""

from .config import BlockDistillationConfig
from .trainer import BlockDistillationTrainer, BlockFinetuneTrainer

__all__ = ["BlockDistillationConfig", "BlockDistillationTrainer", "BlockFinetuneTrainer"]
