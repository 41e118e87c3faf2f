"""Every per-item seed and content digest of the study, in one place.

Seeds are derived from what an item is (its key, the operation, the base seed), never from the order
items are processed in or the number of workers, so a result does not depend on either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """torch's global CPU generator seeded with `seed` inside the block, to build a model's initial
    weights on the CPU from the seed alone; after it the caller's random state, CPU and CUDA, is as
    it was (only the CPU generator is seeded: `torch.manual_seed` would also reseed every GPU's)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


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
