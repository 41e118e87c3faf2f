"""`featmap serve`: the Ray Serve application (featmap_ray.serve) until Ctrl-C / SIGTERM."""

from __future__ import annotations

from featmap_ray.config import Config
from featmap_ray.featinv.data import check_featinv
from featmap_ray.stages import base


def check_catalogue(cfg: Config) -> None:
    """The allow-lists: FeatInv models (MLflow URIs resolve) and finished mapping runs of the study."""
    from featmap_ray.serve import catalogue

    catalogue.check(cfg)


def serve_until_interrupted(cfg: Config) -> None:
    """Deploy the service, print where it is, keep it up until Ctrl-C / SIGTERM."""
    import signal
    import threading

    from ray import serve

    from featmap_ray.serve import deployments

    url = deployments.start(cfg)
    docs = f"[serve] API docs: {url}/docs  (OpenAPI: {url}/openapi.json)\n" if cfg.serve.docs else ""
    print(f"[serve] page: {url}/\n{docs}[serve] models: {url}/models   Ctrl-C stops the service", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()


STAGE = base.Stage(
    "serve", "FeatInv as a service: web page + HTTP API on Ray Serve (until Ctrl-C)", serve_until_interrupted,
    details="Starts the composed application (ingress, backbone, FeatInv and mapping deployments) on "
            "serve.host:serve.port (127.0.0.1 by default) and prints the page's and the API docs' URLs. On a "
            "cluster use conf/serve.yaml with `serve run` / `serve deploy` (docs/how-to/serving.md).",
    keys=(*base.RAY_KEYS, "serve", "serve.limits", "serve.featinv", "featinv", "extract.backbones"),
    checks=(check_featinv, check_catalogue), reads=("featinv", "runs", "images", "features"))
