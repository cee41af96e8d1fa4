"""bd3lm: block discrete diffusion language models (BD3-LM) — training, sampling and evaluation."""

import os as _os

_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bd3lm.cache import KVCache  # noqa: E402
from bd3lm.model import BD3LM, BD3LMConfig, BD3LMOutput  # noqa: E402

__all__ = ["BD3LM", "BD3LMConfig", "BD3LMOutput", "KVCache"]
__version__ = "0.1.0"
