import pytest

from featmap_ray.config import INGEST_FORMATS, ConfigError, load_config


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


BASE = "dataset: {name: d, root: /data}\n"


def test_demo_config_loads_and_resolves_storage():
    cfg = load_config("conf/demo.yaml")
    assert cfg.storage.startswith("/")
    made = {m.name for m in cfg.manipulate.manipulations()}
    assert [m.name for m in cfg.manipulate.manipulations()][:2] == ["rotation_90", "mirror_h"]
    # Every direct manipulation the demo's study fits is one the demo makes.
    studied = {name for group in cfg.mapping.datasets["skimage_demo"].values() for name in group.manipulations}
    assert {name for name in studied if not name.startswith("qwen:")} <= made


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["extract.batch_size=8", "dataset.classes=[a, b]", "storage=s3://b/x",
                                               "mlflow.tracking_uri=http://mlflow:5000"])
    assert cfg.extract.batch_size == 8 and cfg.dataset.classes == ["a", "b"] and cfg.storage == "s3://b/x"


def test_dataset_image_formats_and_aspect_limit(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.dataset.formats == INGEST_FORMATS and cfg.dataset.max_aspect == 10
    cfg = load_config(_write(tmp_path, BASE), ["dataset.formats=[png, ppm]", "dataset.max_aspect=4"])
    assert cfg.dataset.formats == ["PNG", "PPM"] and cfg.dataset.max_aspect == 4


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        (BASE + "datset: {}\n", [], "datset: unknown key"),
        (BASE, ["dataset.num_clases=3"], "dataset.num_clases: unknown key"),
        (BASE, ["extract.batch_size=abc"], "extract.batch_size"),
        (BASE, ["extract.batch_size=0"], "extract.batch_size"),
        (BASE, ["extract.dtype=float64"], "extract.dtype"),
        (BASE, ["manipulate.ops={mirror: [x]}"], "mirror"),
        (BASE, ["manipulate.ops={rotate: [90]}"], "rotate"),
        ("storage: x\n", [], "dataset: Field required"),
        (BASE, ["extract.backbones=[{name: resnet50, pretrained: false, checkpoint: /w.pth}]"], "pretrained is false"),
        (BASE, ["novalue"], "key=value"),
        (BASE, ["dataset.formats=[PNG, EPS]"], "dataset.formats"),  # never read (Pillow runs Ghostscript on EPS)
        (BASE, ["dataset.formats=[]"], "dataset.formats"),
        (BASE, ["dataset.max_aspect=0.5"], "dataset.max_aspect"),
        # Names become folder names: never a path, `.`, `..` or hidden (a report could land on another's).
        (BASE, ["mapping.study=.."], "mapping.study"),
        (BASE, ["mapping.study=../other"], "mapping.study"),
        (BASE, ["featinv.training.run_name=.hidden"], "featinv.training.run_name"),
        (BASE, ["featinv.training.run_name=a..b"], "featinv.training.run_name"),
        ("dataset: {name: a/b, root: /data}\n", [], "dataset.name"),
        (BASE, ["serve.featinv_models={..: /w}"], "serve.featinv_models"),
        (BASE, ["serve.limits.formats=[PNG, EPS]"], "EPS, FITS, ICNS and ICO are never read"),
    ],
)
def test_bad_config_is_rejected_with_the_key_named(tmp_path, text, overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text), overrides)
    assert needle in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [1,\n"))
