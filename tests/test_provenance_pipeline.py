"""The provenance rule of the four stages that write Lance tables (ingest, manipulate, edit, extract), through
`featmap <stage>`: the same settings resume and write nothing; another setting refuses before writing,
naming it (old -> new); `overwrite=true` recomputes exactly the stale rows, leaving a table equal to one
built fresh with the new settings and the other groups' rows where they were. A manipulation made again
makes exactly its features stale. The same refuse / overwrite on an S3 bucket (moto on loopback)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import lance
import numpy as np
import pytest
import yaml

from featmap_ray import backbones, cli, pretrained
from featmap_ray.config import BackboneRequest, Config, EditConfig, load_config
from featmap_ray.io import imageio, tables
from featmap_ray.seeding import derive_seed
from featmap_ray.stages import edit, extract, ingest, manipulate
from tests.conftest import make_config, tiny_backbone, write_image

N_ORIGINALS = 6  # 2 classes x (2 train + 1 test)
VARIANTS = (tables.ORIGINAL, "rotation_90", "noise_40")
LAYER = "stage3"
# One prompt on one train image per class: 2 edits, 64x64 working area, 2 steps (tests/test_edit.py).
EDIT = {"model": "tiny", "dtype": "float32", "steps": 2, "working_pixels": 4096, "num_actors": 1,
        "images_per_class": {"train": 1}, "prompts": {"t": [{"name": "Make_blue", "prompt": "Make it blue."}]}}
# Edits of one key made by two pipelines (other actors) agree to ~1e-6 in float, which can move a pixel
# across a rounding boundary: one 8-bit level at most (as in tests/test_edit.py).
EDIT_LEVELS = 1


# -- helpers ----------------------------------------------------------------------------------------

def featmap(*argv: str) -> tuple[int, str, str]:
    """`featmap ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def refusal(stderr: str) -> str:
    """The ProvenanceMismatch message in a command's stderr (from its first line to the ways out)."""
    start = stderr.index("stored outputs were made by other settings")
    return stderr[start:stderr.index("--overwrite", start)]


def at(cfg: Config, storage: Path, *overrides: str) -> tuple[Config, str]:
    """`cfg` with its storage root at `storage` and `overrides`, and the config file that says so."""
    data = {**cfg.model_dump(mode="json"), "storage": str(storage)}
    path = storage.parent / f"{storage.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(str(path), list(overrides)), str(path)


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def version(uri: str) -> int:
    return lance.dataset(uri).version


def rows(uri: str, filter: str | None = None) -> dict[tuple[str, str], dict]:
    return {(r["source_id"], r["variant"]): r for r in lance.dataset(uri).to_table(filter=filter).to_pylist()}


def addresses(uri: str, filter: str | None = None) -> dict[tuple[str, str], int]:
    """Where each row lies (fragment and offset): a row deleted and written again lies elsewhere."""
    table = lance.dataset(uri).to_table(columns=["source_id", "variant"], filter=filter, with_row_address=True)
    return dict(zip(tables.row_keys(table), table["_rowaddr"].to_pylist(), strict=True))


def variant(name: str) -> str:
    return f"variant = '{name}'"


def features(uri: str) -> dict[tuple[str, str], np.ndarray]:
    table = lance.dataset(uri).to_table(columns=["source_id", "variant", "feature"])
    return dict(zip(tables.row_keys(table), tables.tensor_numpy(table["feature"]).astype(np.float32), strict=True))


def assert_same_features(got: dict, want: dict) -> None:
    """Float16 maps of the same images and weights, computed in other batches: float32 results that differ
    by ~1e-6 relative can round to neighbouring float16 values, one float16 step (2**-10 relative) apart;
    values near zero get an absolute allowance of 1e-5 of the map's largest value."""
    assert got.keys() == want.keys()
    for key, ref in want.items():
        np.testing.assert_allclose(got[key], ref, rtol=2**-10, atol=1e-5 * np.abs(ref).max(), err_msg=str(key))


def backbone_override(**extra) -> str:
    return f"extract.backbones=[{json.dumps(tiny_backbone('convnext_base', layers=[LAYER], **extra))}]"


# -- the stores every test copies ---------------------------------------------------------------------

@dataclass
class Stores:
    cfg: Config  # the settings every store below was made with (storage: `ingested`)
    ingested: Path  # after ingest
    extracted: Path  # after ingest, manipulate and extract


@pytest.fixture(scope="module")
def stores(tmp_path_factory, ray_session, single_torch_thread) -> Stores:  # every test that runs a stage uses it
    tmp = tmp_path_factory.mktemp("provenance")
    seed = 0
    for cls in ("a_cls", "b_cls"):
        for split, n in (("train", 2), ("test", 1)):
            for i in range(n):
                write_image(tmp / "data" / "images" / split / cls / f"{i}.png", seed=seed)
                seed += 1
    cfg = make_config(tmp / "ingested", tmp / "data")
    ingest.run(cfg)
    extracted = copy_store(tmp / "ingested", tmp / "extracted")
    cfg_extracted, _ = at(cfg, extracted)
    manipulate.run(cfg_extracted)
    extract.run(cfg_extracted)
    return Stores(cfg, tmp / "ingested", extracted)


@dataclass
class Reseeded:
    """A store whose noise_40 variant `featmap manipulate` made again with manipulate.seed=1 (--overwrite)."""

    store: Path
    cfg: Config  # manipulate.seed=1
    path: str
    same: tuple[int, str, str]  # `featmap manipulate` with the same settings
    refused: tuple[int, str, str]  # with manipulate.seed=1
    overwritten: tuple[int, str, str]  # with manipulate.seed=1 overwrite=true
    versions: list[int]  # of the images table: before, after the same settings, after the refusal
    addresses: dict  # of the images table's rows before the overwrite
    status_before: list  # manipulate.status with seed 1 before the overwrite
    fresh: Path  # built from the originals with manipulate.seed=1, then extracted


@pytest.fixture(scope="module")
def reseeded(stores, tmp_path_factory) -> Reseeded:
    tmp = tmp_path_factory.mktemp("reseeded")
    store = copy_store(stores.extracted, tmp / "store")
    _, path = at(stores.cfg, store)
    images = tables.Store(str(store)).layout.images
    versions, before = [version(images)], addresses(images)
    same = featmap("manipulate", "--config", path)
    versions.append(version(images))
    refused = featmap("manipulate", "--config", path, "manipulate.seed=1")
    versions.append(version(images))
    cfg1, _ = at(stores.cfg, store, "manipulate.seed=1")
    status_before = manipulate.status(cfg1)
    overwritten = featmap("manipulate", "--config", path, "manipulate.seed=1", "overwrite=true")

    fresh = copy_store(stores.ingested, tmp / "fresh")
    fresh_cfg, _ = at(stores.cfg, fresh, "manipulate.seed=1")
    manipulate.run(fresh_cfg)
    extract.run(fresh_cfg)
    return Reseeded(store, cfg1, path, same, refused, overwritten, versions, before, status_before, fresh)


# -- ingest -----------------------------------------------------------------------------------------

def test_ingest_resumes_refuses_another_size_and_overwrites_the_originals(stores, tmp_path):
    store = copy_store(stores.extracted, tmp_path / "store")
    _, path = at(stores.cfg, store)
    images = tables.Store(str(store)).layout.images
    v0, variants_before = version(images), addresses(images, f"variant != '{tables.ORIGINAL}'")

    assert featmap("ingest", "--config", path)[0] == 0
    assert version(images) == v0  # resumed: nothing to write

    code, _, err = featmap("ingest", "--config", path, "dataset.image_size=48")
    assert code == 1 and "image_size: 64 -> 48" in refusal(err) and "[original]" in refusal(err)
    assert version(images) == v0

    code, out, _ = featmap("ingest", "--config", path, "dataset.image_size=48", "overwrite=true")
    assert code == 0 and f"recomputed (--overwrite): {N_ORIGINALS} rows" in out
    fresh_cfg, _ = at(stores.cfg, tmp_path / "fresh", "dataset.image_size=48")
    ingest.run(fresh_cfg)
    fresh = rows(tables.Store(fresh_cfg.storage).layout.images)
    assert rows(images, variant(tables.ORIGINAL)) == fresh  # the same deterministic code: identical PNGs
    assert {(r["width"], r["height"]) for r in fresh.values()} == {(48, 48)}
    assert addresses(images, f"variant != '{tables.ORIGINAL}'") == variants_before  # the variants were not rewritten

    # ... but they were made from the old originals: manipulate now refuses, naming the input.
    cfg48, path48 = at(stores.cfg, store, "dataset.image_size=48")
    assert [s.state for s in ingest.status(cfg48)] == ["up to date"]
    [status] = manipulate.status(cfg48)
    assert status.state == "stale" and "input images#original changed" in status.detail
    v1 = version(images)
    code, _, err = featmap("manipulate", "--config", path48)
    assert code == 1 and "input images#original changed" in refusal(err) and version(images) == v1


def test_a_second_dataset_is_written_alongside_the_first(stores, tmp_path):
    store = copy_store(stores.ingested, tmp_path / "store")
    _, path = at(stores.cfg, store)
    assert featmap("ingest", "--config", path, "dataset.name=u")[0] == 0
    datasets = lance.dataset(tables.Store(str(store)).layout.images).to_table(columns=["dataset"])["dataset"]
    assert sorted(datasets.to_pylist()) == ["t"] * N_ORIGINALS + ["u"] * N_ORIGINALS


# -- manipulate ---------------------------------------------------------------------------------------

def test_manipulate_resumes_with_the_same_seed(reseeded):
    assert reseeded.same[0] == 0 and reseeded.versions[1] == reseeded.versions[0]


def test_manipulate_refuses_another_seed_of_a_random_op_only(reseeded):
    code, _, err = reseeded.refused
    message = refusal(err)
    assert code == 1 and "seed: 0 -> 1" in message
    assert "[noise_40]" in message and "rotation_90" not in message  # rotation draws no random numbers
    assert reseeded.versions[2] == reseeded.versions[0]
    [status] = reseeded.status_before
    assert status.state == "stale" and "noise_40" in status.detail and "seed: 0 -> 1" in status.detail


def test_manipulate_overwrite_recomputes_exactly_that_variant(reseeded):
    code, out, _ = reseeded.overwritten
    assert code == 0 and f"recomputed (--overwrite): {N_ORIGINALS} rows" in out
    images = tables.Store(str(reseeded.store)).layout.images
    assert rows(images) == rows(tables.Store(str(reseeded.fresh)).layout.images)  # integer pixels, same code
    for (sid, name), row in rows(images, variant("noise_40")).items():
        assert row["seed"] == derive_seed(1, sid, name)
    after = addresses(images)
    assert {k: a for k, a in after.items() if k[1] != "noise_40"} == {
        k: a for k, a in reseeded.addresses.items() if k[1] != "noise_40"}  # originals and rotation untouched
    assert all(after[k] != a for k, a in reseeded.addresses.items() if k[1] == "noise_40")
    assert [s.state for s in manipulate.status(reseeded.cfg)] == ["up to date"]


def test_extract_after_a_manipulation_was_made_again_recomputes_exactly_its_features(reseeded, tmp_path):
    store = copy_store(reseeded.store, tmp_path / "store")
    cfg, path = at(reseeded.cfg, store)
    uri = tables.Store(str(store)).layout.features("convnext_base", LAYER)
    v0, before, old = version(uri), addresses(uri), features(uri)
    [status] = extract.status(cfg)
    assert status.state == "stale" and "1 group(s), e.g. noise_40" in status.detail

    code, _, err = featmap("extract", "--config", path)
    message = refusal(err)
    assert code == 1 and "[noise_40]" in message and "input images#noise_40 changed" in message
    assert "rotation_90" not in message and "[original" not in message and version(uri) == v0

    code, out, _ = featmap("extract", "--config", path, "overwrite=true")
    assert code == 0 and f"recomputed (--overwrite): {N_ORIGINALS} rows" in out
    after = addresses(uri)
    assert {k: a for k, a in after.items() if k[1] != "noise_40"} == {k: a for k, a in before.items() if k[1] != "noise_40"}
    new = features(uri)
    assert_same_features(new, features(tables.Store(str(reseeded.fresh)).layout.features("convnext_base", LAYER)))
    assert all(not np.allclose(new[k], old[k], rtol=2**-10) for k in new if k[1] == "noise_40")  # other images, other maps
    assert [s.state for s in extract.status(cfg)] == ["up to date"]


def test_manipulate_refuses_and_overwrites_on_an_object_store(stores, s3_bucket, tmp_path):
    data = {**stores.cfg.model_dump(mode="json"), "storage": f"{s3_bucket}/featmap",
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}}  # an object-store root needs one
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(str(path), [])
    ingest.run(cfg)
    manipulate.run(cfg)
    images = tables.Store(cfg.storage).layout.images
    v0, before = version(images), addresses(images)

    code, _, err = featmap("manipulate", "--config", str(path), "manipulate.seed=1")
    assert code == 1 and "seed: 0 -> 1" in refusal(err) and "[noise_40]" in refusal(err)
    assert version(images) == v0

    code, _, _ = featmap("manipulate", "--config", str(path), "manipulate.seed=1", "overwrite=true")
    assert code == 0
    originals = rows(images, variant(tables.ORIGINAL))
    noisy = rows(images, variant("noise_40"))
    assert len(noisy) == N_ORIGINALS
    for (sid, name), row in noisy.items():  # the independent definition of noise_40 (test_pipeline_stages)
        seed = derive_seed(1, sid, name)
        orig = imageio.decode_png_rgb(originals[sid, tables.ORIGINAL]["image"])
        noise = np.random.default_rng(seed).normal(0, 40, orig.shape).astype(np.int16)
        expected = np.clip(orig.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        assert row["seed"] == seed
        np.testing.assert_array_equal(imageio.decode_png_rgb(row["image"]), expected)
    after = addresses(images)
    assert {k: a for k, a in after.items() if k[1] != "noise_40"} == {k: a for k, a in before.items() if k[1] != "noise_40"}


# -- extract ------------------------------------------------------------------------------------------

def test_extract_resumes_refuses_other_weights_and_overwrites(stores, tmp_path):
    store = copy_store(stores.extracted, tmp_path / "store")
    _, path = at(stores.cfg, store)
    st = tables.Store(str(store))
    uri = st.layout.features("convnext_base", LAYER)
    v0, images_v0, old = version(uri), version(st.layout.images), features(uri)

    assert featmap("extract", "--config", path)[0] == 0
    assert (version(uri), version(st.layout.images)) == (v0, images_v0)

    code, _, err = featmap("extract", "--config", path, backbone_override(init_seed=1))
    message = refusal(err)
    assert code == 1 and "init_seed: 0 -> 1" in message and f"({len(VARIANTS) * N_ORIGINALS} rows)" in message
    assert version(uri) == v0

    code, out, _ = featmap("extract", "--config", path, backbone_override(init_seed=1), "overwrite=true")
    assert code == 0 and f"recomputed (--overwrite): {len(VARIANTS) * N_ORIGINALS} rows" in out
    assert version(st.layout.images) == images_v0  # its input was only read
    fresh = copy_store(stores.extracted, tmp_path / "fresh")
    shutil.rmtree(fresh / "features")
    fresh_cfg, _ = at(stores.cfg, fresh, backbone_override(init_seed=1))
    extract.run(fresh_cfg)
    new = features(uri)
    assert_same_features(new, features(tables.Store(fresh_cfg.storage).layout.features("convnext_base", LAYER)))
    assert all(not np.allclose(new[k], old[k], rtol=2**-10) for k in new)  # other weights, other maps

    cfg1, _ = at(stores.cfg, store, backbone_override(init_seed=1))
    assert [s.state for s in extract.status(cfg1)] == ["up to date"]
    lance.dataset(uri).delete(f"variant = 'rotation_90' AND source_id = '{min(new)[0]}'")
    [status] = extract.status(cfg1)
    assert (status.state, status.detail) == ("partial", f"{len(VARIANTS) * N_ORIGINALS - 1} of {len(VARIANTS) * N_ORIGINALS} rows")


# -- edit ---------------------------------------------------------------------------------------------

def test_edit_resumes_refuses_other_steps_and_overwrites(stores, tmp_path):
    store = copy_store(stores.ingested, tmp_path / "store")
    cfg, path = at(stores.cfg.model_copy(update={"edit": EditConfig(**EDIT)}), store)
    edit.run(cfg)
    images = tables.Store(str(store)).layout.images
    semantic_rows = "family = 'semantic'"
    v0, originals_before, old = version(images), addresses(images, variant(tables.ORIGINAL)), rows(images, semantic_rows)
    assert len(old) == 2

    assert featmap("edit", "--config", path)[0] == 0
    assert version(images) == v0

    steps3 = "edit.steps=3"
    code, _, err = featmap("edit", "--config", path, steps3)
    assert code == 1 and "num_inference_steps: 2 -> 3" in refusal(err) and "[qwen:Make_blue:0]" in refusal(err)
    assert version(images) == v0
    cfg3 = load_config(path, [steps3])
    [status] = edit.status(cfg3)
    assert status.state == "stale" and "num_inference_steps: 2 -> 3" in status.detail

    code, out, _ = featmap("edit", "--config", path, steps3, "overwrite=true")
    assert code == 0 and "recomputed (--overwrite): 2 rows" in out
    assert addresses(images, variant(tables.ORIGINAL)) == originals_before
    fresh_cfg, _ = at(cfg3, copy_store(stores.ingested, tmp_path / "fresh"))
    edit.run(fresh_cfg)
    got, want = rows(images, semantic_rows), rows(tables.Store(fresh_cfg.storage).layout.images, semantic_rows)
    assert got.keys() == want.keys() == old.keys()
    for key in want:
        pixels = {k: imageio.decode_png_rgb(r[key]["image"]).astype(int) for k, r in (("got", got), ("want", want))}
        assert np.abs(pixels["got"] - pixels["want"]).max() <= EDIT_LEVELS, key
        assert {k: v for k, v in got[key].items() if k != "image"} == {k: v for k, v in want[key].items() if k != "image"}
        assert json.loads(got[key]["params"])["num_inference_steps"] == 3
    assert [s.state for s in edit.status(cfg3)] == ["up to date"]


# -- weights identities ---------------------------------------------------------------------------------

def test_a_checkpoint_is_recorded_by_a_hash_of_its_content(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"first weights")
    request = BackboneRequest(name="convnext_base", checkpoint=str(path))
    spec = backbones.get_spec("convnext_base")
    first = extract.weights_source(request, spec)
    assert first == {"weights": "checkpoint", "checkpoint": str(path),
                     "checkpoint_sha256": hashlib.sha256(b"first weights").hexdigest()}
    path.write_bytes(b"other weights")  # the same path, other weights: another source
    assert extract.weights_source(request, spec)["checkpoint_sha256"] == hashlib.sha256(b"other weights").hexdigest()
    assert extract.weights_source(BackboneRequest(name="convnext_base", pretrained=False, init_seed=3), spec) == {
        "weights": "random", "init_seed": 3}


def test_a_model_folder_is_told_apart_by_its_hub_revision_or_its_files(tmp_path):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen-Image-Edit-2511" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert pretrained.weights_identity(snapshot) == "Qwen/Qwen-Image-Edit-2511@0123abcd"

    folder = tmp_path / "editor"
    (folder / "transformer").mkdir(parents=True)
    weights = folder / "transformer" / "model.safetensors"
    weights.write_bytes(b"1234")
    first = pretrained.weights_identity(folder)
    assert first.startswith(str(folder.resolve())) and pretrained.weights_identity(folder) == first
    weights.write_bytes(b"5678")  # replaced: same size, a later modification time
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    assert pretrained.weights_identity(folder) != first
