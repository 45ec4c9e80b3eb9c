"""What a run prints: one log handler and no dependency chatter.

Hydra configures logging before the job starts (console and `<run dir>/run.log`, see
configs/run.yaml). Lightning, imported later, attaches its own console handler to the
`lightning` logger while letting records propagate to Hydra's, so every Lightning line
would be printed twice; `quiet_dependencies` removes that handler and filters messages
that are advertising or restate a setting, not information about this run.
"""

from __future__ import annotations

import logging
import re
import warnings

# Lightning messages that carry nothing about this run: product tips, and lines that only
# restate a Trainer argument the config set (`limit_val_batches=1.0`, `val_check_interval`).
_CHATTER = re.compile(r"Tip: For seamless|`Trainer\([a-z_]+=[^)]*\)` was configured so")

_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _CHATTER.search(record.getMessage())


def quiet_dependencies() -> None:
    """Idempotent: one handler per record (Hydra's), chatter filtered, known dependency
    deprecation warnings that users cannot act on silenced. Lightning's handler stays
    where nothing else would print its records (no root handler: plain Python use)."""
    keep_handler = not logging.getLogger().handlers
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [] if keep_handler else list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's own console handler
                logger.removeHandler(handler)
        logger.propagate = logger.propagate or not keep_handler
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropChatter) for f in logger.filters):
            logger.addFilter(_DropChatter())
    # Raised inside Lightning's own pytree helper on recent torch releases, on every run.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                            category=Warning)
