"""Every per-item seed and content digest of the study, in one place.

Seeds are derived from what an item is (its key, the operation, the base seed), never from the order
items are processed in or the number of workers, so a result does not depend on either.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def derive_seed(*parts: str | int) -> int:
    """Stable 63-bit seed from sha256 of the parts joined with "\\x1f".

    Unlike `hash()`, this does not change between processes. Parts are compared
    via `str`, so `1` and `"1"` give the same seed.
    """
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def fingerprint(settings: Any) -> str:
    """A short, stable digest of JSON-able settings (key order does not matter)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str) -> str:
    """sha256 of a file's content (read in 1 MiB chunks): what a weight file is, wherever it lies."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
