import io

import lance
import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image

from featmap_ray.config import INGEST_FORMATS, DatasetConfig
from featmap_ray.io import imageio, tables
from featmap_ray.stages import ingest
from tests.conftest import make_config, write_image
from tests.image_corpus import REFUSED_FORMATS, encode, write_corpus


def _dataset(root, **kw):
    return DatasetConfig(**{"name": "t", "root": str(root), **kw})


def test_featmap_layout_ids_unique_and_stable(class_folders):
    items = ingest.discover(_dataset(class_folders), str(class_folders))
    assert len(items) == 8
    # same file names (00000.png ...) in both classes and both splits: ids still unique
    assert len({i.source_id for i in items}) == 8
    again = ingest.discover(_dataset(class_folders), str(class_folders))
    assert [i.source_id for i in again] == [i.source_id for i in items]
    # labels: index in the sorted list of all classes, as torchvision's ImageFolder assigns them
    assert {(i.class_name, i.class_idx) for i in items} == {("a_cls", 0), ("b_cls", 1)}
    assert {i.split for i in items} == {"train", "test"}


def test_flat_split_folders_give_one_implicit_class(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            write_image(tmp_path / "images" / split / f"bedroom_{i}.jpg", seed=i)
    (tmp_path / "images" / "train" / "README.txt").write_text("not an image and not listed")
    items = ingest.discover(_dataset(tmp_path, name="lsun"), str(tmp_path))
    assert len(items) == 5
    assert {(i.class_name, i.class_idx) for i in items} == {("lsun", 0)}


def test_imagefolder_and_split_folders_layouts(tmp_path):
    for cls in ("cat", "dog"):
        write_image(tmp_path / "folder" / cls / "x.png")
        write_image(tmp_path / "splits" / "test" / cls / "x.png")
    items = ingest.discover(_dataset(tmp_path / "folder", default_split="val"), str(tmp_path / "folder"))
    assert sorted((i.split, i.class_name) for i in items) == [("val", "cat"), ("val", "dog")]
    items = ingest.discover(_dataset(tmp_path / "splits"), str(tmp_path / "splits"))
    assert sorted((i.split, i.class_name) for i in items) == [("test", "cat"), ("test", "dog")]


def test_class_subsets_and_seeded_per_class_samples(tmp_path):
    for c in range(5):
        for i in range(6):
            write_image(tmp_path / "images" / "train" / f"class_{c}" / f"{i}.png", size=(8, 8), seed=c * 10 + i)
    pick = ingest.discover(_dataset(tmp_path, num_classes=2, images_per_class=3), str(tmp_path))
    assert sorted({i.class_name for i in pick}) == ["class_0", "class_1"]
    assert len(pick) == 6
    # labels stay those of the full dataset
    assert {i.class_idx for i in pick} == {0, 1}
    same = ingest.discover(_dataset(tmp_path, num_classes=2, images_per_class=3), str(tmp_path))
    assert [i.path for i in same] == [i.path for i in pick]
    other_seed = ingest.discover(_dataset(tmp_path, num_classes=2, images_per_class=3, seed=1), str(tmp_path))
    assert [i.path for i in other_seed] != [i.path for i in pick]
    explicit = ingest.discover(_dataset(tmp_path, classes=["class_4"]), str(tmp_path))
    assert {(i.class_name, i.class_idx) for i in explicit} == {("class_4", 4)}
    with pytest.raises(ValueError, match="class_9"):
        ingest.discover(_dataset(tmp_path, classes=["class_9"]), str(tmp_path))


def test_original_row_is_torchvision_resize_and_centre_crop(tmp_path):
    pixels = write_image(tmp_path / "a.png", size=(97, 61), seed=3)
    row = ingest.original_row({"source_id": "s", "split": "train", "class_idx": 0, "class_name": "c", "path": "a.png"},
                              (tmp_path / "a.png").read_bytes(), _dataset(tmp_path, image_size=48))
    expected = np.asarray(T.CenterCrop(48)(T.Resize(48)(Image.fromarray(pixels)))).astype(np.int16)
    stored = np.asarray(Image.open(io.BytesIO(row["image"])))
    # Only the crop is resampled: torchvision's pixels up to one level of rounding (tests/test_imageio.py).
    diff = np.abs(stored.astype(np.int16) - expected)
    assert diff.max() <= 1 and diff.mean() <= 0.05
    assert (row["width"], row["height"], row["variant"]) == (48, 48, "original")


def test_dataset_formats_decide_what_is_read(tmp_path):
    # .ppm/.pgm files are listed (dataset.extensions), but PPM is read only when dataset.formats names it.
    ppm = encode(Image.new("RGB", (40, 40), (1, 2, 3)), "PPM")
    item = {"source_id": "s", "split": "train", "class_idx": 0, "class_name": "c", "path": "a.ppm"}
    with pytest.raises(imageio.ImageDecodeError) as info:
        ingest.original_row(item, ppm, _dataset(tmp_path, image_size=32))
    assert info.value.reason == "format_not_allowed" and "a.ppm: PPM images are not accepted" in str(info.value)
    row = ingest.original_row(item, ppm, _dataset(tmp_path, image_size=32, formats=[*INGEST_FORMATS, "ppm"]))
    assert np.all(np.asarray(Image.open(io.BytesIO(row["image"]))) == (1, 2, 3))
    # max_aspect comes from the dataset config too
    wide = encode(Image.new("RGB", (120, 40)), "PNG")
    with pytest.raises(imageio.ImageDecodeError, match="3.0:1, beyond the limit of 2.5:1"):
        ingest.original_row(item, wide, _dataset(tmp_path, image_size=32, max_aspect=2.5))
    assert ingest.original_row(item, wide, _dataset(tmp_path, image_size=32, max_aspect=3))["width"] == 32


@pytest.mark.usefixtures("ray_session")
def test_ingest_keeps_good_images_records_bad_ones_and_resumes(tmp_path):
    root = tmp_path / "data"
    expected = write_corpus(root / "images" / "train" / "junk")
    cfg = make_config(tmp_path / "store", root, dataset={"min_side": 32, "image_size": 32})
    summary = ingest.run(cfg)
    good = sorted(k for k, reason in expected.items() if reason is None)
    bad = {k: reason for k, reason in expected.items() if reason is not None}
    st = tables.Store(cfg.storage)
    images = lance.dataset(st.layout.images).to_table().to_pylist()
    assert sorted(r["source_path"].split("/junk/")[1] for r in images) == good
    assert summary.written[st.layout.images] == len(good) and summary.failed == len(bad)
    for r in images:
        img = Image.open(io.BytesIO(r["image"]))
        assert img.mode == "RGB" and img.size == (32, 32)
    errors = {r["path"].split("/junk/")[1]: r for r in st.errors("ingest").to_pylist()}
    assert {k: r["reason"] for k, r in errors.items()} == bad
    assert all(k in r["message"] for k, r in errors.items())  # the message names the file
    # The hostile files among them: elongated PNGs refused from the header, other formats by name.
    assert {k for k, r in bad.items() if r == "aspect_ratio"} == {"elongated_32x100000.png", "elongated_8x3000000.png"}
    assert all(f"{fmt} images are not accepted" in errors[k]["message"] for k, fmt in REFUSED_FORMATS.items())

    again = ingest.run(cfg)  # resume: nothing new, failures not duplicated
    assert again.written[st.layout.images] == 0 and again.skipped == len(good)
    assert lance.dataset(st.layout.images).count_rows() == len(good)
    assert st.errors("ingest").num_rows == len(bad)
