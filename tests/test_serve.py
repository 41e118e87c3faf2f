"""The FeatInv service over real HTTP on 127.0.0.1: every route, every bad input, against independent definitions.

One application per module (tiny backbone and tiny FeatInv, 2 DDIM steps): two FeatInv models (the
default fresh one and a perturbed one registered in MLflow), a published mapping run, and stored
images and feature maps from the real ingest and extract stages. Expected images come from the
library's own sampler on maps computed here with timm and torchvision (not the service's code);
expected metrics are recomputed with numpy.
"""

import base64
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from pathlib import Path

import lance
import mlflow
import numpy as np
import psutil
import pytest
import requests
import timm
import torch
import torchvision.transforms as T
import yaml
from PIL import Image
from ray import serve
from safetensors.numpy import save as save_safetensors
from safetensors.torch import load_file

from featmap_ray import cli
from featmap_ray.io import tables, tracking
from featmap_ray.mapping import artefacts, grid
from featmap_ray.serve import deployments, models
from featmap_ray.stages import extract, ingest
from tests.conftest import TINY_BACKBONES, make_config, write_image
from tests.image_corpus import blank_png, encode, eps_file, fits_file
from tests.ray_cluster import BIN, REPO, clean_env, free_ports

# One torch thread here, as in each replica (num_cpus 1): the library's images are then computed alike.
pytestmark = pytest.mark.usefixtures("ray_session", "single_torch_thread")

SEEDS = [3, 4]
STEPS = 2
SHAPE = (64, 9, 9)  # tiny convnext_base stage3
IMAGENET = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SOURCE_VIEW = T.Compose([T.Resize(288), T.CenterCrop(288)])  # what `extract` feeds the backbone
# The paper's evaluation resize of a reconstruction: bilinear on float pixels.
RECONSTRUCTION_VIEW = T.Compose([T.ToTensor(), T.Resize((288, 288)), IMAGENET])


def _reference_backbone():
    torch.manual_seed(0)  # = init_seed
    return timm.create_model("convnext_base", pretrained=False, **TINY_BACKBONES["convnext_base"]).eval()


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for i in range(2):
        write_image(root / "images" / "test" / "c0" / f"{i}.png", size=(72, 64), seed=i)
    port = free_ports(1)[0]
    cfg = make_config(tmp_path_factory.mktemp("store"), root,
                      featinv={"base_model": "tiny", "encoder_hidden_channels": 16},
                      serve={"port": port, "steps": STEPS, "seeds": [100],
                             "limits": {"max_body_mb": 0.25, "min_upload_kb_s": 1, "upload_grace_s": 2}})
    ingest.run(cfg)
    extract.run(cfg)

    # Two FeatInv models whose images depend on the map (a fresh one's ControlNet residuals are zero): the
    # fresh model with perturbed ControlNet weights, as the folder featinv.controlnet ("default") and, perturbed
    # otherwise, logged and registered in MLflow ("other").
    folders = {}
    for name, seed in (("default", 7), ("other", 8)):
        model = models.load(cfg, models.DEFAULT)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for p in model.controlnet.parameters():
                p.add_(0.05 * torch.randn_like(p))
        folders[name] = tmp_path_factory.mktemp(name) / "controlnet"
        model.controlnet.save_pretrained(folders[name])
    cfg.featinv.controlnet = str(folders["default"])
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    run_id = client.create_run(tracking.experiment_id(cfg), run_name="featinv-train:other").info.run_id
    tracking.log_metrics(client, run_id, {"loss": 0.25})
    registered = tracking.register_model(cfg, run_id, str(folders["other"]), "controlnet", "featinv-test",
                                         {}).registered

    # A published mapping run (a linear map) with its MLflow run; its provenance names no input features, so it
    # is never stale.
    spec = grid.RunSpec(dataset="t", group="direct", backbone="convnext_base", layer="stage3",
                        manipulation="hue_shift_60", model="linear", loss_name="paper", loss={"mse": 1.0},
                        apply_transform=False, normalise=False)
    torch.manual_seed(1)
    artefacts.publish(artefacts.run_dir(cfg, spec), artefacts.build_mapping(spec, SHAPE, None),
                      {"spec": spec.to_dict(), "shape": list(SHAPE), "norm": None, "digest": "d",
                       "provenance": {"settings": {}, "inputs": {}}})
    client, mapping_run_id = tracking.child_run(cfg, spec.key, spec.tags, parent=None, params={}, digest="d")
    tracking.log_metrics(client, mapping_run_id, {"eval_cos_median_upper": 0.75})

    # Served by an alias: resolved once, at deploy time, to the version it names now.
    client.set_registered_model_alias("featinv-test", "live", registered.rsplit("/", 1)[1])
    cfg.serve.featinv_models = {"other": "models:/featinv-test@live"}
    cfg.serve.mapping_runs = [spec.key]
    url = deployments.start(cfg)
    yield {"cfg": cfg, "url": url, "other_run": run_id, "other": registered, "other_folder": folders["other"],
           "default_folder": folders["default"], "spec": spec,
           "mapping_run": mapping_run_id, "default_model": models.load(cfg, models.DEFAULT),
           "other_model": models.load(cfg, "other")}
    serve.shutdown()


def _post(service, route, params=None, **kwargs) -> requests.Response:
    if "data" in kwargs:  # raw bytes: the service takes only the content types it documents
        kwargs.setdefault("headers", {"Content-Type": "application/octet-stream"})
    return requests.post(service["url"] + route, params={"seeds": SEEDS, **(params or {})}, timeout=120, **kwargs)


def _library_images(service, features: np.ndarray, model: str = "default") -> np.ndarray:
    """The library's sampler on the same map and seeds: what every answer must show."""
    cfg = service["cfg"]
    sampling = models.Sampling(STEPS, cfg.featinv.sampling.guidance, cfg.featinv.sampling.control_scale)
    batch = torch.from_numpy(np.repeat(features[None].astype(np.float32), len(SEEDS), 0))
    return models.sample(service[f"{model}_model"], batch, SEEDS, sampling, cfg)


def _assert_reconstructions(body: dict, expected: np.ndarray, source_map: np.ndarray,
                            source_logits: torch.Tensor | None) -> None:
    assert [r["seed"] for r in body["reconstructions"]] == SEEDS
    backbone = _reference_backbone()
    for r, image in zip(body["reconstructions"], expected):
        got = _decode(r["image"])
        # Same map and seed; batched with other items vs alone: float rounding may move a pixel by one level.
        assert got.shape == image.shape and np.abs(got.astype(int) - image).max() <= 1
        with torch.no_grad():
            x = RECONSTRUCTION_VIEW(Image.fromarray(got))[None]
            recon_map, recon_logits = backbone.forward_features(x)[0].numpy(), backbone(x)[0]
        cos = (source_map * recon_map).sum(0) / (np.linalg.norm(source_map, axis=0) * np.linalg.norm(recon_map, axis=0))
        assert r["metrics"]["cos_median_lower"] == pytest.approx(float(np.median(cos)), abs=5e-3)  # 81 positions
        if source_logits is None:
            assert r["metrics"]["top1_match"] is None and r["metrics"]["top5_match"] is None
        else:
            top1 = int(source_logits.argmax())
            assert r["metrics"]["source_top1"] == top1
            assert r["metrics"]["top1_match"] == (int(recon_logits.argmax()) == top1)
            assert r["metrics"]["top5_match"] == (top1 in recon_logits.topk(5).indices.tolist())
    rows = [r["metrics"] for r in body["reconstructions"]]
    assert body["metrics"]["cos_median_lower"] == pytest.approx(np.mean([m["cos_median_lower"] for m in rows]))
    assert body["metrics"]["count"] == len(SEEDS)


def _uploaded(seed=5) -> tuple[bytes, np.ndarray, np.ndarray, torch.Tensor]:
    """An image file, its backbone view, its map and logits, computed here with torchvision and timm."""
    pixels = np.random.default_rng(seed).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    view = np.asarray(SOURCE_VIEW(Image.fromarray(pixels)))
    with torch.no_grad():
        x = IMAGENET(T.functional.to_tensor(view))[None]
        backbone = _reference_backbone()
        # C order: timm's ConvNeXt returns a channels-last tensor, which safetensors would save as raw memory.
        return _png(pixels), view, np.ascontiguousarray(backbone.forward_features(x)[0].numpy()), backbone(x)[0]


# -- routes ---------------------------------------------------------------------------------------

def test_health_models_page_and_docs(service):
    url = service["url"]
    assert requests.get(url + "/health", timeout=30).json()["status"] == "ok"
    listing = requests.get(url + "/models", timeout=30).json()
    assert listing["backbone"] == {"name": "convnext_base", "layer": "stage3", "input_size": 288,
                                   "feature_shape": list(SHAPE), "pretrained": False}
    featinv = {m["name"]: m for m in listing["featinv"]}
    assert featinv["default"]["source"] == service["cfg"].featinv.controlnet and featinv["default"]["mlflow_run_id"] is None
    assert featinv["other"]["mlflow_run_id"] == service["other_run"] and featinv["other"]["metrics"] == {"loss": 0.25}
    [run] = listing["mapping_runs"]
    assert run["name"] == service["spec"].key and run["mlflow_run_id"] == service["mapping_run"]
    assert run["metrics"] == {"eval_cos_median_upper": 0.75} and run["manipulation"] == "hue_shift_60"
    assert listing["limits"]["max_seeds"] == 8 and listing["defaults"]["steps"] == STEPS

    index = requests.get(url + "/", timeout=30)
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert requests.get(url + "/static/app.js", timeout=30).status_code == 200
    assert requests.get(url + "/docs", timeout=30).status_code == 200
    paths = requests.get(url + "/openapi.json", timeout=30).json()["paths"]
    assert {"/health", "/models", "/reconstruct", "/reconstruct/mapped", "/reconstruct/features",
            "/reconstruct/sample"} <= set(paths)


def test_an_uploaded_image_three_ways_gives_the_librarys_reconstructions_and_metrics(service):
    data, view, source_map, source_logits = _uploaded()
    expected = _library_images(service, source_map)
    bodies = [_post(service, "/reconstruct", files={"file": ("x.png", data, "image/png")}),
              _post(service, "/reconstruct", data=data, headers={"Content-Type": "image/png"}),
              _post(service, "/reconstruct", json={"image": "data:image/png;base64," + base64.b64encode(data).decode()})]
    for response in bodies:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["input"] == "image" and base64.b64decode(body["original"]) == data
        assert np.array_equal(_decode(body["backbone_view"]), view)
        assert body["model"]["featinv"] == "default" and body["model"]["backbone"] == "convnext_base"
        assert body["model"]["layer"] == "stage3" and body["parameters"]["steps"] == STEPS
        _assert_reconstructions(body, expected, source_map, source_logits)


def test_png_answers_carry_the_first_reconstruction_and_its_metrics(service):
    data = _uploaded()[0]
    body = _post(service, "/reconstruct", data=data).json()
    for response in (_post(service, "/reconstruct", {"format": "png"}, data=data),
                     _post(service, "/reconstruct", data=data, headers={"Accept": "image/png",
                                                                       "Content-Type": "image/png"})):
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert np.abs(np.asarray(Image.open(io.BytesIO(response.content))).astype(int)
                      - _decode(body["reconstructions"][0]["image"])).max() <= 1
        assert response.headers["X-Featmap-Model"] == "default" and response.headers["X-Featmap-Seed"] == str(SEEDS[0])
        cos = float(response.headers["X-Featmap-Cos-Median-Lower"])
        assert cos == pytest.approx(body["reconstructions"][0]["metrics"]["cos_median_lower"], abs=1e-3)


def test_an_uploaded_feature_map_as_npy_or_safetensors(service):
    _, _, source_map, _ = _uploaded(seed=6)
    half = source_map.astype(np.float16)
    cases = [({"files": {"file": ("m.npy", _npy(source_map))}}, source_map),
             ({"data": save_safetensors({"features": source_map[None]})}, source_map),  # (1, C, H, W)
             ({"json": {"features": base64.b64encode(_npy(half)).decode()}}, half.astype(np.float32))]
    for kwargs, sent in cases:
        response = _post(service, "/reconstruct/features", **kwargs)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["input"] == "features" and body["original"] is None and body["backbone_view"] is None
        _assert_reconstructions(body, _library_images(service, sent), sent, None)


def test_a_stored_sample_uses_the_stored_map_and_image(service):
    cfg = service["cfg"]
    st = tables.Store(cfg.storage)
    row = lance.dataset(st.layout.features("convnext_base", "stage3")).to_table(
        filter="variant = 'original'").slice(0, 1)
    source_id = row["source_id"][0].as_py()
    stored_map = tables.tensor_numpy(row["feature"])[0].astype(np.float32)
    png = st.rows(st.layout.images, [(source_id, "original")], ["image"])["image"][0].as_py()
    response = _post(service, "/reconstruct/sample", {"source_id": source_id, "variant": "original"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["source_id"] == source_id and body["variant"] == "original"
    assert base64.b64decode(body["original"]) == png
    view = np.asarray(SOURCE_VIEW(Image.open(io.BytesIO(png)).convert("RGB")))
    assert np.array_equal(_decode(body["backbone_view"]), view)
    with torch.no_grad():
        logits = _reference_backbone()(IMAGENET(T.functional.to_tensor(view))[None])[0]
    _assert_reconstructions(body, _library_images(service, stored_map), stored_map, logits)


def test_the_mapped_route_applies_the_runs_weights_then_inverts(service):
    spec = service["spec"]
    data, _, source_map, source_logits = _uploaded(seed=8)
    published = artefacts.published_version(artefacts.run_dir(service["cfg"], spec))
    weights = load_file(str(published / artefacts.MODEL_FILE))
    w, b = weights["inner.proj.weight"].numpy(), weights["inner.proj.bias"].numpy()
    mapped = np.einsum("oc,chw->ohw", w, source_map) + b[:, None, None]  # one affine map at every position
    response = _post(service, "/reconstruct/mapped", {"run": spec.key}, data=data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["input"] == "mapped" and body["mapping_run"] == spec.key
    cos = (mapped * source_map).sum(0) / (np.linalg.norm(mapped, axis=0) * np.linalg.norm(source_map, axis=0))
    assert body["mapped_vs_input_cos_median_lower"] == pytest.approx(float(np.median(cos)), abs=1e-4)
    _assert_reconstructions(body, _library_images(service, mapped), mapped, source_logits)


def test_a_request_names_a_model_of_the_allow_list(service):
    _, _, source_map, _ = _uploaded(seed=9)
    response = _post(service, "/reconstruct/features", {"model": "other"}, data=_npy(source_map))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["featinv"] == "other" and body["model"]["mlflow_run_id"] == service["other_run"]
    assert body["model"]["source"] == service["other"]
    other = _library_images(service, source_map, "other")
    assert np.abs(other.astype(int) - _library_images(service, source_map)).max() > 8  # the models differ
    _assert_reconstructions(body, other, source_map, None)


def test_an_mlflow_alias_is_pinned_to_one_version_when_the_service_starts(service):
    cfg, url = service["cfg"], service["url"]
    listing = {m["name"]: m for m in requests.get(url + "/models", timeout=30).json()["featinv"]}
    assert listing["other"]["requested"] == "models:/featinv-test@live"
    assert listing["other"]["source"] == service["other"]  # models:/featinv-test/<version>
    assert requests.get(url + "/health", timeout=30).json()["featinv"]["other"] == service["other"]
    _, _, source_map, _ = _uploaded(seed=10)
    before = _post(service, "/reconstruct/features", {"model": "other"}, data=_npy(source_map)).json()
    # The alias moves to another version (the default model's weights) while the service runs.
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    run_id = client.create_run(tracking.experiment_id(cfg), run_name="featinv-train:moved").info.run_id
    moved = tracking.register_model(cfg, run_id, str(service["default_folder"]), "controlnet", "featinv-test", {})
    client.set_registered_model_alias("featinv-test", "live", moved.registered.rsplit("/", 1)[1])
    assert moved.registered != service["other"]
    after = _post(service, "/reconstruct/features", {"model": "other"}, data=_npy(source_map)).json()
    assert after["model"]["source"] == service["other"]
    for a, b in zip(before["reconstructions"], after["reconstructions"], strict=True):  # the pinned weights
        assert np.abs(_decode(a["image"]).astype(int) - _decode(b["image"])).max() <= 1


# -- bad input --------------------------------------------------------------------------------------

def _bomb_png(side: int) -> bytes:
    """A valid PNG header claiming side x side pixels, with almost no data: refused before decoding."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _bad_requests(service) -> list[tuple[str, dict, int, str]]:
    """(route, requests kwargs, status, a phrase of the message) for every kind of bad request."""
    good = _uploaded()[0]
    ok_map = np.zeros(SHAPE, np.float32)
    nan_map, inf_map = ok_map.copy(), ok_map.copy()
    nan_map[3, 2, 2], inf_map[0, 0, 0] = np.nan, np.inf
    return [
        ("/reconstruct", {"data": b"this is not an image"}, 400, "not a recognised image"),
        ("/reconstruct", {"data": good[: len(good) // 2]}, 400, "truncated"),
        ("/reconstruct", {"data": _bomb_png(8000)}, 413, "decompression bomb"),
        ("/reconstruct", {"data": _png(np.zeros((4, 4, 3), np.uint8))}, 400, "too small"),
        ("/reconstruct", {"data": b"\0" * (300 * 1024)}, 413, "max_body_mb"),
        ("/reconstruct", {"data": b""}, 400, "empty body"),
        ("/reconstruct", {"json": {"image": "***"}}, 400, "not valid base64"),
        ("/reconstruct", {"json": {"picture": "aGk="}}, 400, '{"image": "<base64>"}'),
        ("/reconstruct", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ("/reconstruct", {"files": {"upload": ("x.png", good)}}, 400, "file field named 'file'"),
        ("/reconstruct/features", {"data": _npy(ok_map[:32])}, 422, "expected 64 channels"),
        ("/reconstruct/features", {"data": _npy(ok_map.transpose(1, 2, 0))}, 422, "channels-last"),
        ("/reconstruct/features", {"data": _npy(ok_map[:, :5])}, 422, "spatial size"),
        ("/reconstruct/features", {"data": _npy(np.stack([ok_map, ok_map]))}, 422, "expected one map"),
        ("/reconstruct/features", {"data": _npy(nan_map)}, 422, "NaN or Inf"),
        ("/reconstruct/features", {"data": _npy(inf_map)}, 422, "NaN or Inf"),
        ("/reconstruct/features", {"data": _npy(ok_map.astype(bool))}, 400, "real numbers"),
        ("/reconstruct/features", {"data": _pickled_npy()}, 400, "without pickle"),
        ("/reconstruct/features", {"data": b"PK\x03\x04 a zip file"}, 400, "neither a .npy file nor a .safetensors"),
        ("/reconstruct/features", {"data": save_safetensors({"a": ok_map, "b": ok_map})}, 422, "one tensor"),
        ("/reconstruct/features", {"data": _npy(ok_map), "params": {"seeds": list(range(9))}}, 422,
         "query.seeds: List should have at most 8 items"),
        ("/reconstruct/features", {"data": _npy(ok_map), "params": {"seeds": [1, 1]}}, 422, "repeated"),
        ("/reconstruct/features", {"data": _npy(ok_map), "params": {"seeds": ["x"]}}, 422, "seeds"),
        ("/reconstruct/features", {"data": _npy(ok_map), "params": {"steps": 51}}, 422,
         "query.steps: Input should be less than or equal to 50"),
        ("/reconstruct/features", {"data": _npy(ok_map), "params": {"steps": 0}}, 422, "query.steps"),
        ("/reconstruct/features", {"data": _npy(ok_map), "params": {"seeds": [-1]}}, 422, "query.seeds"),
        ("/reconstruct/features", {"data": _npy(ok_map), "params": {"guidance": 1e9}}, 422, "guidance"),
        ("/reconstruct/features", {"data": _npy(ok_map), "params": {"control_scale": -1}}, 422, "control_scale"),
        ("/reconstruct/features", {"data": _npy(ok_map), "params": {"model": "nope"}}, 422,
         "query.model: Input should be 'default' or 'other'"),
        ("/reconstruct/features", {"data": _npy(ok_map), "params": {"model": "../../etc"}}, 422, "model"),
        ("/reconstruct/features", {"data": _npy(ok_map), "params": {"format": "gif"}}, 422, "format"),
        ("/reconstruct/mapped", {"data": good, "params": {"run": "nope"}}, 422, "query.run: Input should be"),
        ("/reconstruct/mapped", {"data": good}, 422, "run"),
        ("/reconstruct/sample", {"params": {"source_id": "nope"}}, 404, "no stored sample nope/original"),
        ("/reconstruct/sample", {"params": {"source_id": "a/../b"}}, 422, "source_id"),
        ("/nowhere", {}, 404, "Not Found"),
    ]


def test_every_bad_request_gets_a_4xx_json_naming_the_problem_and_the_replicas_keep_serving(service):
    for route, kwargs, status, phrase in _bad_requests(service):
        kwargs = dict(kwargs)
        params = {"seeds": [1], **kwargs.pop("params", {})}
        if "data" in kwargs:
            kwargs.setdefault("headers", {"Content-Type": "application/octet-stream"})
        response = requests.post(service["url"] + route, params=params, timeout=60, **kwargs)
        assert response.status_code == status, (route, phrase, response.text)
        assert response.headers["content-type"] == "application/json", (route, phrase)
        assert phrase in response.json()["error"], (route, phrase, response.json())
        assert "Traceback" not in response.text and "ray::" not in response.text
    statuses = serve.status().applications[service["cfg"].serve.app_name].deployments
    assert {name: d.status for name, d in statuses.items()} == {name: "HEALTHY" for name in statuses}
    assert _post(service, "/reconstruct", data=_uploaded()[0]).status_code == 200


# -- hostile input: each test measures what the ingress replica's process uses while it answers -----

def _ingress() -> psutil.Process:
    """The ingress replica's process: a worker of this session's Ray (a descendant of this process, titled
    as Ray titles actor workers)."""
    [process] = [p for p in psutil.Process().children(recursive=True)
                 if " ".join(p.cmdline()).startswith("ray::ServeReplica:featmap:Ingress")]
    return process


def _kib(process: psutil.Process, field: str) -> int:
    line = next(x for x in Path(f"/proc/{process.pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def _peak_growth_mb(process: psutil.Process, send) -> tuple[requests.Response, float]:
    """(the answer, how far the process's peak resident memory rose above its resident memory before):
    Linux resets the peak (VmHWM) to the current resident size when 5 is written to clear_refs."""
    Path(f"/proc/{process.pid}/clear_refs").write_text("5")
    before = _kib(process, "VmRSS")
    response = send()
    return response, (_kib(process, "VmHWM") - before) / 1024


def test_elongated_images_are_refused_from_the_header_and_big_ones_cost_what_the_output_needs(service):
    ingress = _ingress()
    assert _post(service, "/reconstruct", data=_uploaded()[0]).status_code == 200  # a warm service is measured
    for width, height in ((32, 100_000), (100_000, 32), (8, 3_000_000)):
        data = blank_png(width, height)
        response, growth = _peak_growth_mb(ingress, lambda: _post(service, "/reconstruct", data=data))
        assert response.status_code == 400 and "(aspect_ratio)" in response.json()["error"], response.text
        assert growth < 100, (width, height, growth)
    # 12 megapixels within every limit: decoded once (36 MB), then only the crop is resized.
    response, growth = _peak_growth_mb(ingress, lambda: _post(service, "/reconstruct", data=blank_png(4000, 3000)))
    assert response.status_code == 200, response.text
    assert growth < 100, growth


def _saved(fmt: str) -> bytes:
    return encode(Image.fromarray(np.full((64, 64, 3), 90, np.uint8)), fmt)


@pytest.mark.parametrize("fmt", ["EPS", "FITS", "ICO", "ICNS", "BMP"])
def test_formats_outside_the_allow_list_are_415_and_start_no_process(service, fmt):
    data = {"EPS": eps_file, "FITS": fits_file}.get(fmt, lambda: _saved(fmt))()
    ingress = _ingress()
    children = {p.pid for p in ingress.children(recursive=True)}
    for kwargs in ({"data": data, "headers": {"Content-Type": "image/png"}}, {"files": {"file": ("x.png", data)}}):
        response = _post(service, "/reconstruct", **kwargs)
        assert response.status_code == 415, response.text
        assert f"{fmt} images are not accepted" in response.json()["error"] and "(format_not_allowed)" in response.text
    assert {p.pid for p in ingress.children(recursive=True)} <= children  # Ghostscript never ran


def test_requests_a_page_on_another_site_could_make_are_refused(service):
    url, png = service["url"], _uploaded()[0]
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/mixed"):
        response = _post(service, "/reconstruct", data=png, headers={"Content-Type": kind})
        assert response.status_code == 415 and kind in response.json()["error"], response.text
    # No Content-Type at all (a fetch of a bare body needs no CORS preflight either).
    response = requests.post(url + "/reconstruct", data=png, timeout=30)
    assert response.status_code == 415 and "(none)" in response.json()["error"]
    # DNS rebinding: a name that resolves to 127.0.0.1 but is not this service's.
    for method in ("get", "post"):
        response = requests.request(method, url + "/health", headers={"Host": "attacker.example"}, timeout=30)
        assert response.status_code == 400 and "attacker.example" in response.json()["error"]
    response = _post(service, "/reconstruct", data=png, headers={"Content-Type": "image/png",
                                                                 "Origin": "http://attacker.example"})
    assert response.status_code == 403 and "attacker.example" in response.json()["error"]
    # The page's own requests carry its origin, which is this service.
    port = url.rsplit(":", 1)[1].split("/")[0]
    same = _post(service, "/reconstruct", data=png, headers={"Content-Type": "image/png",
                                                             "Origin": f"http://localhost:{port}"})
    assert same.status_code == 200, same.text
    for header, value in (("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer")):
        assert same.headers[header] == value and response.headers[header] == value


def _chunks(total: int, size: int = 2**20):
    for _ in range(total // size):
        yield b"\0" * size


@pytest.mark.parametrize("method, route", [("post", "/reconstruct/sample?source_id=x"), ("get", "/health"),
                                           ("get", "/models"), ("post", "/reconstruct")])
def test_a_64_mb_chunked_body_is_refused_on_every_route(service, method, route):
    ingress = _ingress()
    headers = {"Content-Type": "image/png"} if route == "/reconstruct" else {}
    response, growth = _peak_growth_mb(ingress, lambda: requests.request(
        method, service["url"] + route, data=_chunks(64 * 2**20), headers=headers, timeout=60))
    assert response.status_code == 413, response.text
    assert ("takes no request body" if route != "/reconstruct" else "max_body_mb") in response.json()["error"]
    assert growth < 100, growth


def test_feature_files_whose_headers_claim_huge_arrays_are_refused_before_allocating(service):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000, 100000), }".ljust(117) + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64
    meta = json.dumps({"features": {"dtype": "F32", "shape": [100000, 100000, 100000],
                                    "data_offsets": [0, 4 * 10**15]}}).encode()
    safetensors = struct.pack("<Q", len(meta)) + meta + b"\0" * 64
    ingress = _ingress()
    for data, phrase in ((npy, "claims shape (100000, 100000, 100000)"), (safetensors, ".safetensors")):
        response, growth = _peak_growth_mb(ingress, lambda: _post(service, "/reconstruct/features", data=data))
        assert response.status_code == 400 and phrase in response.json()["error"], response.text
        assert growth < 100, growth


def test_a_method_a_route_does_not_take_is_405_with_allow(service):
    for method, route, allowed in (("put", "/health", "GET"), ("delete", "/reconstruct", "POST"),
                                   ("get", "/reconstruct/sample", "POST")):
        response = requests.request(method, service["url"] + route, timeout=30)
        assert response.status_code == 405 and response.headers["Allow"] == allowed, (route, response.headers)
        assert response.json()["error"] == "Method Not Allowed"


def test_a_trickling_upload_is_cut_off_within_its_allowance_and_the_next_one_is_served(service):
    """1 byte per second against min_upload_kb_s = 1 after upload_grace_s = 2 (this module's config): the
    ingress answers 408 once the body falls behind, well before the 120 s request timeout."""
    host, port = service["url"].removeprefix("http://").split("/")[0].split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(f"POST /reconstruct?seeds=1 HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/png\r\n"
                     "Content-Length: 100000\r\nConnection: close\r\n\r\n".encode())
        conn.settimeout(1.0)
        answer, answer_at = b"", None
        while time.monotonic() - started < 60:
            try:
                conn.sendall(b"\0")
            except OSError:  # the server closed its side after answering
                pass
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
            if answer.startswith(b"HTTP/") and b"\r\n\r\n" in answer and answer.endswith(b"}"):
                answer_at = time.monotonic()
                break
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"min_upload_kb_s" in answer, answer
    assert answer_at is not None and answer_at - started < 2 + 10, answer_at  # grace + slack on 2 cores
    assert _post(service, "/reconstruct", data=_uploaded()[0]).status_code == 200


def test_schemathesis_finds_every_answer_documented_and_every_limit_in_the_schema(service, tmp_path):
    """Schemathesis (all checks: 5xx, undocumented statuses and content types, response schemas, 405 with Allow,
    valid requests accepted, invalid ones rejected) against the served /openapi.json, with a fixed seed and a
    fixed number of examples per route (schemathesis.toml in this folder)."""
    st = tables.Store(service["cfg"].storage)
    stored = lance.dataset(st.layout.features("convnext_base", "stage3")).to_table(columns=["source_id"])
    result = subprocess.run(
        [str(BIN / "schemathesis"), "--config-file", str(REPO / "tests" / "schemathesis.toml"), "run",
         service["url"] + "/openapi.json", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, check=False,
        env={**os.environ, "FEATMAP_SAMPLE_SOURCE_ID": stored["source_id"][0].as_py()})
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout or "passed" in result.stdout, result.stdout[-3000:]


def test_conf_serve_yaml_is_a_valid_serve_config_that_builds_the_app():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "conf" / "serve.yaml").read_text()))
    [app] = config.applications
    assert app.import_path == "featmap_ray.serve.deployments:app_builder" and config.http_options.host == "127.0.0.1"
    config_file = str(REPO / app.args["config"])
    # The demo serves models:/featinv-demo/latest: resolved to a version when the app is built, so without
    # that MLflow database the build stops, naming the URI, before any replica starts.
    with pytest.raises(tracking.ModelNotFound, match="models:/featinv-demo/latest: no MLflow database"):
        deployments.app_builder({**app.args, "config": config_file,
                                 "overrides": ["storage=/nonexistent/featmap_data"]})
    built = deployments.app_builder({**app.args, "config": config_file, "overrides": ["featinv.controlnet=null"]})
    assert isinstance(built, serve.Application)
    with pytest.raises(ValueError, match="expected config"):
        deployments.app_builder({"conf": "x.yaml"})



def _config_file(tmp_path, **serve_section) -> str:
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "storage": str(tmp_path / "store"), "dataset": {"name": "t", "root": str(tmp_path)},
        "extract": {"backbones": [{"name": "convnext_base", "pretrained": False, "layers": ["stage3"],
                                   "model_kwargs": TINY_BACKBONES["convnext_base"]}]},
        "featinv": {"base_model": "tiny", "encoder_hidden_channels": 16}, "serve": serve_section}))
    return str(config)


@pytest.mark.parametrize("serve_section, message", [
    ({"mapping_runs": ["nope"]}, "serve.mapping_runs: 'nope' is not a finished run of study 'study'"),
    ({"featinv_models": {"x": "runs:/0123abcd/controlnet"}}, "runs:/0123abcd/controlnet"),
])
def test_featmap_serve_refuses_an_allow_list_entry_before_starting(tmp_path, capsys, serve_section, message):
    assert cli.main(["serve", "--config", _config_file(tmp_path, **serve_section)]) == 1
    assert message in capsys.readouterr().err


def test_featmap_serve_prints_its_urls_serves_and_stops_on_sigterm(tmp_path):
    """The command a user runs: its own embedded Ray, Serve on 127.0.0.1:<serve.port>, until SIGTERM."""
    port = free_ports(1)[0]
    config = _config_file(tmp_path, port=port, steps=1)
    # A Ray of its own: a short RAY_TMPDIR (Unix socket paths are limited), removed afterwards.
    ray_tmp = tempfile.mkdtemp(prefix="fs", dir="/tmp")
    proc = subprocess.Popen([str(BIN / "featmap"), "serve", "--config", config], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=clean_env(RAY_TMPDIR=ray_tmp))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # keeps the pipe drained
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any(line.startswith("[serve] models:") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines[-40:])
            time.sleep(0.5)
        printed = "".join(line for line in lines if line.startswith("[serve]"))
        url = f"http://127.0.0.1:{port}"
        assert f"page: {url}/\n" in printed and f"API docs: {url}/docs" in printed
        assert requests.get(url + "/health", timeout=30).json()["status"] == "ok"
        assert requests.get(url + "/", timeout=30).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


# The web page in headless Chromium, against this module's application (tests/serve_page.py): collected
# here so that the application starts once.
from tests.serve_page import (  # noqa: E402, F401
    browser,
    page,
    test_a_dropped_file_is_what_run_sends,
    test_a_stored_sample_by_its_source_id,
    test_an_upload_shows_the_original_the_backbones_view_and_the_reconstructions,
    test_bad_input_shows_a_readable_message,
    test_the_api_docs_render_offline,
    test_the_mapped_tab_reconstructs_an_upload_after_a_mapping_run,
    test_the_page_and_the_api_docs_answer_with_a_strict_content_security_policy,
)

