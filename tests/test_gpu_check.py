"""The GPU run-book's dry run (`benchmarks/gpu_check.py --dry-run`): every part's code path on CPU with tiny models,
so that a change that breaks the GPU check fails here. No timing is asserted, only that each part ran and
printed the numbers it is about."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"\d+\.\d+"


@pytest.mark.slow
def test_gpu_check_dry_run():
    # A process of its own: the check starts and stops its own Ray and sets torch's thread count.
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    out = result.stdout
    assert result.returncode == 0, f"{out[-4000:]}\n{result.stderr[-4000:]}"
    assert "DRY RUN" in out and "All weights are RANDOM" in out
    for part in ("extract", "featinv", "editor", "serve"):
        assert re.search(rf"^== {part} \(budget \d+ s\)$", out, re.M), part
        assert re.search(rf"^== {part}: done in {NUMBER} s of \d+ s", out, re.M), part
    # extract: the job and the bare loop (batched, batch size 1) in bfloat16 channels-last, and their ratio
    for label in (r"ours \(stage3\)", r"bare batched \(bs 2\)", r"bare unbatched \(bs 1\)"):
        assert re.search(rf"^  {label} +{NUMBER} s +{NUMBER} img/s +ratio to bare batched +{NUMBER}$", out, re.M), label
    assert "bfloat16 autocast, channels-last" in out
    assert re.search(rf"extract job / bare loop: {NUMBER} ", out)
    # featinv: the reference loop and both batched paths, the speed-up, images that agree
    assert re.search(rf"^  reference \(B=1, 2 fwd/step\) +{NUMBER} s +{NUMBER} img/s", out, re.M)
    assert re.search(rf"^  batch 2, 1 fwd/step \(ours\) +{NUMBER} s +{NUMBER} img/s", out, re.M)
    assert re.search(rf"batched / reference loop: {NUMBER}x; largest pixel difference 0$", out, re.M)
    # editor: built on the meta device, step time; CUDA peak memory skipped with its reason
    assert "built on the meta device, materialised on cpu: 2 layers" in out
    assert re.search(rf"step time {NUMBER} s; transformer time per edit at 10 steps {NUMBER} s", out)
    assert "CUDA peak memory: skipped (no CUDA device in a dry run)" in out
    # serve: both modes answered, and the throughput ratio
    for mode, batch in (("batched", 2), ("unbatched", 1)):
        assert re.search(rf"^  {mode} +max_batch_size +{batch} +{NUMBER} req/s", out, re.M), mode
    assert re.search(rf"batched / unbatched throughput: {NUMBER}x", out)
    assert re.search(rf"^GPU check done: parts {NUMBER} s of \d+ s budget; {NUMBER} s in all", out, re.M)
