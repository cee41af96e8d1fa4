"""Data layer, no Lightning/Hydra: corpora and the validation rule (:mod:`.corpus`), token shards (:mod:`.shards`)."""

from bd3lm.data import corpus, shards
from bd3lm.data.corpus import *  # noqa: F403
from bd3lm.data.shards import *  # noqa: F403

__all__ = [*corpus.__all__, *shards.__all__]
