"""Where work runs: connect to Ray (embedded local instance by default) and set Ray Data defaults."""

from __future__ import annotations

import logging
import os

from featmap_ray.config import Config

log = logging.getLogger(__name__)


def configure_data_context() -> None:
    import ray.data
    from ray.data._internal.tensor_extensions.arrow import FixedShapeTensorFormat

    ctx = ray.data.DataContext.get_current()
    # Canonical Arrow tensors (FixedSizeList storage), so non-Ray readers of our Lance tables work.
    ctx.arrow_fixed_shape_tensor_format = FixedShapeTensorFormat.ARROW_NATIVE
    ctx.execution_options.preserve_order = False


def init_ray(cfg: Config) -> None:
    """Attach to `ray.address` / RAY_ADDRESS (a cluster, or the one `ray job submit` runs in),
    else start an embedded local Ray. Safe to call twice."""
    import ray

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, ignore_reinit_error=True)
        else:
            memory = cfg.ray.object_store_memory_mb
            ray.init(
                address="local",  # always a new embedded instance, never a stray `ray start` head
                num_cpus=cfg.ray.num_cpus,
                include_dashboard=False,
                object_store_memory=None if memory is None else memory * 2**20,
                ignore_reinit_error=True,
            )
        log.info("Ray resources: %s", ray.cluster_resources())
    configure_data_context()


def actor_device(use_gpu: bool, torch_threads: int | None = None):
    """The torch device of a model actor. On CPU, use `torch_threads` or all the node's cores: Ray sets
    OMP_NUM_THREADS to the actor's CPU count (1)."""
    import torch

    if not use_gpu:
        torch.set_num_threads(torch_threads or os.cpu_count() or 1)
    return torch.device("cuda" if use_gpu else "cpu")
