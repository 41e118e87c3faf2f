"""Manipulate and extract as Ray Data jobs on small real tables: semantics, determinism, resume."""

import io
import json

import lance
import numpy as np
import pyarrow as pa
import pytest
import timm
import torch
import torchvision.transforms as T
from PIL import Image

from featmap_ray.io import tables
from featmap_ray.seeding import derive_seed
from featmap_ray.stages import extract, ingest, manipulate
from tests.conftest import TINY_BACKBONES, make_config, tiny_backbone

pytestmark = pytest.mark.usefixtures("ray_session")


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _images(cfg) -> dict[tuple[str, str], dict]:
    rows = lance.dataset(tables.Store(cfg.storage).layout.images).to_table().to_pylist()
    return {(r["source_id"], r["variant"]): r for r in rows}


@pytest.fixture
def ingested(tmp_path, class_folders):
    cfg = make_config(tmp_path / "store", class_folders)
    ingest.run(cfg)
    return cfg


def test_manipulate_writes_every_variant_with_reference_semantics(ingested):
    summary = manipulate.run(ingested)
    rows = _images(ingested)
    originals = [k for k in rows if k[1] == "original"]
    assert summary.written[tables.Store(ingested.storage).layout.images] == 2 * len(originals) == 16
    for sid, _ in originals:
        orig = _pixels(rows[sid, "original"]["image"])
        np.testing.assert_array_equal(_pixels(rows[sid, "rotation_90"]["image"]), np.rot90(orig, k=1))
        noisy = rows[sid, "noise_40"]
        seed = derive_seed(0, sid, "noise_40")
        assert noisy["seed"] == seed and json.loads(noisy["params"]) == {"op": "noise", "param": 40}
        noise = np.random.default_rng(seed).normal(0, 40, orig.shape).astype(np.int16)
        expected = np.clip(orig.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(_pixels(noisy["image"]), expected)
        assert rows[sid, "rotation_90"]["class_idx"] == rows[sid, "original"]["class_idx"]
        assert rows[sid, "rotation_90"]["family"] == "geometric"


def test_manipulate_is_independent_of_batching_and_resumes(ingested, tmp_path):
    manipulate.run(ingested)
    first = {k: r["image"] for k, r in _images(ingested).items()}
    # a different batch size (different task boundaries) on a second copy gives identical bytes
    other = make_config(tmp_path / "store2", ingested.dataset.root, manipulate={"batch_size": 1})
    ingest.run(other)
    manipulate.run(other)
    assert {k: r["image"] for k, r in _images(other).items()} == first
    # lose some variants (as if the job had died before committing them), then run again
    ds = lance.dataset(tables.Store(ingested.storage).layout.images)
    ds.delete("variant = 'noise_40' AND class_idx = 0")
    summary = manipulate.run(ingested)
    assert summary.written[tables.Store(ingested.storage).layout.images] == 4 and summary.skipped == 12
    again = _images(ingested)
    assert len(again) == lance.dataset(tables.Store(ingested.storage).layout.images).count_rows() == 24
    assert {k: r["image"] for k, r in again.items()} == first


def _reference_features(name: str, png: bytes, size: int, kwargs: dict) -> dict[str, torch.Tensor]:
    """Independent definition: torchvision preprocessing and timm's own module walk / forward_features."""
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    x = tf(Image.open(io.BytesIO(png)).convert("RGB"))[None]
    timm_name = {"convnext_base": "convnext_base", "swinv2_base": "swinv2_base_window12to24_192to384",
                 "dinov3_vitb16": "vit_base_patch16_dinov3", "resnet50": "resnet50"}[name]
    torch.manual_seed(0)
    model = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        final = model.forward_features(x)
        if name == "convnext_base":
            h, maps = model.stem(x), {}
            for i, stage in enumerate(model.stages):
                h = stage(h)
                maps[f"stage{i}"] = h
            return maps
        if name == "swinv2_base":
            return {"stage3": final.permute(0, 3, 1, 2)}
        if name == "dinov3_vitb16":
            tokens = final[:, model.num_prefix_tokens:]
            return {"final": tokens.reshape(1, 14, 14, -1).permute(0, 3, 1, 2)}
        return {"final": final}


FAMILIES = {  # backbone -> (layers checked, input size)
    "convnext_base": (["stage0", "stage3"], 288),
    "swinv2_base": (["stage3"], 384),
    "dinov3_vitb16": (["final"], 224),
    "resnet50": (["final"], 224),
}


def _stored_feature(uri: str, key: tuple[str, str]) -> np.ndarray:
    table = lance.dataset(uri).to_table(filter=f"source_id = '{key[0]}' AND variant = '{key[1]}'")
    assert table.num_rows == 1
    return tables.tensor_numpy(table["feature"])[0].astype(np.float32)


def test_extract_matches_a_direct_timm_forward_for_every_family(ingested):
    from featmap_ray.config import BackboneRequest

    ingested.extract.backbones = [BackboneRequest(**tiny_backbone(n, layers=layers)) for n, (layers, _) in FAMILIES.items()]
    summaries = extract.run(ingested)
    assert [s.failed for s in summaries] == [0, 0, 0, 0]
    st = tables.Store(ingested.storage)
    images = _images(ingested)
    key = sorted(images)[0]
    for name, (layers, size) in FAMILIES.items():
        reference = _reference_features(name, images[key]["image"], size, TINY_BACKBONES[name])
        for layer in layers:
            table = lance.dataset(st.layout.features(name, layer)).to_table(columns=["source_id", "variant", "feature"])
            assert table.num_rows == len(images)
            assert set(zip(table["source_id"].to_pylist(), table["variant"].to_pylist())) == set(images)
            feature_type = table.schema.field("feature").type
            assert feature_type.value_type == "halffloat" and feature_type.shape == list(reference[layer].shape[1:])
            meta = json.loads(lance.dataset(st.layout.features(name, layer)).schema.metadata[b"featmap"])
            assert (meta["backbone"], meta["layer"], meta["layout"]) == (name, layer, "CHW")
            stored, ref = _stored_feature(st.layout.features(name, layer), key), reference[layer][0].numpy()
            cos = float((stored * ref).sum() / (np.linalg.norm(stored) * np.linalg.norm(ref)))
            assert cos >= 0.999, (name, layer, cos)


def test_extractor_udfs_turn_corrupt_images_nan_maps_and_failed_forwards_into_failure_rows(ingested):
    from featmap_ray.config import BackboneRequest

    rows = lance.dataset(tables.Store(ingested.storage).layout.images).to_table(
        columns=["source_id", "variant", "split", "class_idx", "image"]).slice(0, 3)
    rows = rows.set_column(4, "image", pa.array([rows["image"][0].as_py(), b"junk", rows["image"][2].as_py()]))
    batch = extract.preprocess_batch(rows, 288, frozenset(extract_keys(rows)))
    assert batch["error_reason"].to_pylist()[1] is not None and "decoding stored image" in batch["error_message"][1].as_py()

    request = BackboneRequest(**tiny_backbone("convnext_base"))
    extractor = extract.FeatureExtractor(request, ["stage3"], "float16", use_gpu=False, torch_threads=1)
    out = extractor(batch)
    assert [r is None for r in out["error_reason"].to_pylist()] == [True, False, True]
    with torch.no_grad():
        extractor.model.stages[3].downsample[1].weight.fill_(float("nan"))
    out = extractor(batch)
    assert out["error_reason"].to_pylist()[0::2] == ["non_finite", "non_finite"]
    assert "NaN or Inf" in out["error_message"][0].as_py()

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    extractor.model.forward_intermediates = out_of_memory
    out = extractor(batch)
    assert out["error_reason"].to_pylist()[0::2] == ["RuntimeError", "RuntimeError"]
    assert "out of memory" in out["error_message"][0].as_py() and "feature:stage3" not in out.column_names


def extract_keys(table) -> list[tuple[str, str]]:
    return list(zip(table["source_id"].to_pylist(), table["variant"].to_pylist()))


def test_extractor_in_bfloat16_channels_last_matches_float32_and_records_its_precision(ingested):
    from featmap_ray.config import BackboneRequest

    st = tables.Store(ingested.storage)
    rows = lance.dataset(st.layout.images).to_table(columns=["source_id", "variant", "split", "class_idx", "image"])
    batch = extract.preprocess_batch(rows.slice(0, 2), 288, frozenset(extract_keys(rows.slice(0, 2))))
    request = BackboneRequest(**tiny_backbone("convnext_base"))
    maps = {}
    for compute, channels_last in (("float32", False), ("bfloat16", True)):
        extractor = extract.FeatureExtractor(request, ["stage3"], "float32", use_gpu=False, torch_threads=1,
                                             compute_dtype=compute, channels_last=channels_last)
        maps[compute] = tables.tensor_numpy(extractor(batch)["feature:stage3"])
    exact, fast = maps["float32"].reshape(2, -1), maps["bfloat16"].reshape(2, -1)
    assert not np.array_equal(exact, fast)  # bfloat16 really computed
    cos = (exact * fast).sum(1) / (np.linalg.norm(exact, axis=1) * np.linalg.norm(fast, axis=1))
    assert (cos > 0.99).all(), cos  # bfloat16 keeps ~3 significant digits

    def settings(compute: str) -> dict:
        cfg = ingested.model_copy(update={"extract": ingested.extract.model_copy(update={"compute_dtype": compute})})
        return extract.plan_backbones(cfg, st)[0].layer_tables[0].settings

    assert "compute_dtype" not in settings("float32")  # tables made before the setting keep their provenance
    assert settings("bfloat16")["compute_dtype"] == "bfloat16"
