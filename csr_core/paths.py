"""Where build outputs live: converted models, KV shards, checkpoints, dictionaries.

Everything goes under one cache folder that git never sees: `$CSR_CACHE_DIR`, else `~/.cache/csr`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = Path(os.environ.get("CSR_CACHE_DIR", Path.home() / ".cache" / "csr")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
