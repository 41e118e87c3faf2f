"""FeatInv-Viz: the concept decomposition, attenuation, heat maps, interpolation and composition against
formulas computed here, and `featmap featinv-viz` end to end on tiny models."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import ray
import torch
import yaml
from PIL import Image
from safetensors.numpy import save_file

from featmap_ray import cli
from featmap_ray.cosine import median_cosine
from featmap_ray.featinv import loading, viz
from featmap_ray.featinv.metrics import BackboneProbe
from featmap_ray.featinv.pipeline import seeded_generators
from featmap_ray.io import tables, tracking
from featmap_ray.io.files import Location
from featmap_ray.stages import extract, ingest, runtime
from tests.conftest import make_config, write_image

C = 12


def planted(seed: int = 0):
    """Vectors from 3 mutually orthogonal planes (cluster sizes 50, 30, 20; positive coefficients, so each
    cluster's directions lie within 90°): the decomposition must find exactly these planes."""
    rng = np.random.default_rng(seed)
    planes = np.linalg.qr(rng.normal(size=(C, 6)))[0].T.reshape(3, 2, C)
    vectors = np.concatenate([rng.uniform(0.5, 1, (n, 2)) @ planes[i] for i, n in enumerate((50, 30, 20))])
    return planes, vectors[rng.permutation(len(vectors))]


@pytest.fixture(scope="module")
def concepts() -> viz.Concepts:
    return viz.decompose(planted()[1], n_concepts=3, rank=2, seed=0)


def projector(basis: np.ndarray) -> np.ndarray:
    """P = Bᵀ(BBᵀ)⁻¹B: the orthogonal projection onto the row space of B."""
    return basis.T @ np.linalg.solve(basis @ basis.T, basis)


def test_decomposition_finds_planted_subspaces_and_its_parts_sum_to_phi(concepts):
    planes, _ = planted()
    for k in range(3):  # ordered by cluster size: the planes in their planted order
        np.testing.assert_allclose(projector(concepts.bases[k]), projector(planes[k]), atol=1e-12)
    stacked = concepts.stacked()
    np.testing.assert_allclose(stacked @ stacked.T, np.eye(6), atol=1e-12)  # orthonormal, mutually orthogonal
    phi = np.random.default_rng(1).normal(size=(C, 4, 5))
    split = viz.parts(phi, concepts)
    assert split.shape == (4, C, 4, 5)
    np.testing.assert_allclose(split.sum(axis=0), phi, atol=1e-12)
    for k in range(3):
        np.testing.assert_allclose(split[k], np.einsum("cd,dhw->chw", projector(planes[k]), phi), atol=1e-12)
    # the four parts are orthogonal at every position
    gram = np.einsum("ichw,jchw->ijhw", split, split)
    off_diagonal = gram[~np.eye(4, dtype=bool)]
    assert np.abs(off_diagonal).max() < 1e-10
    again = viz.decompose(planted()[1], n_concepts=3, rank=2, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(concepts.bases, again.bases, strict=True))  # reproducible


def test_attenuating_a_concept_scales_exactly_its_part(concepts):
    phi = np.random.default_rng(2).normal(size=(C, 3, 3))
    before = viz.parts(phi, concepts)
    after_phi = viz.attenuate(phi, concepts, 1, factor=0.25)
    np.testing.assert_allclose(after_phi, phi - 0.75 * np.einsum("cd,dhw->chw", projector(concepts.bases[1]), phi),
                               atol=1e-12)
    after = viz.parts(after_phi, concepts)
    np.testing.assert_allclose(after[1], 0.25 * before[1], atol=1e-12)
    for k in (0, 2, 3):  # the other concepts and the remainder are untouched
        np.testing.assert_allclose(after[k], before[k], atol=1e-12)
    with pytest.raises(ValueError, match="concept 3: there are 3 concepts"):
        viz.attenuate(phi, concepts, 3)


def test_user_bases_are_loaded_orthonormalised_and_checked(tmp_path, concepts):
    planes, _ = planted()
    path = tmp_path / "bases.safetensors"
    # order: by name; any scale (safetensors writes the raw buffer: contiguous copies)
    save_file({"b_second": np.ascontiguousarray(planes[1] * 3), "a_first": np.ascontiguousarray(planes[0])}, str(path))
    loaded = viz.load_concepts(path.read_bytes(), str(path), C)
    for k in (0, 1):
        np.testing.assert_allclose(projector(loaded.bases[k]), projector(planes[k]), atol=1e-12)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones((2, 1, 7)))
    with pytest.raises(ValueError, match=r"wrong\.npy have dimension \[7\].* 12 channels"):
        viz.load_concepts(wrong.read_bytes(), str(wrong), C)
    dependent = tmp_path / "dependent.npy"
    np.save(dependent, np.stack([planes[0][0], 2 * planes[0][0]]))  # (n_concepts, C): rank 1 each
    with pytest.raises(ValueError, match="concept 1 is .*linearly dependent"):
        viz.load_concepts(dependent.read_bytes(), str(dependent), C)


def test_heat_map_and_mask_against_hand_computed_medians():
    a = [np.zeros((2, 2, 3), np.uint8)] * 3
    b = [np.zeros((2, 2, 3), np.uint8) for _ in range(3)]
    # per-pixel distances per seed: (0,0) 5, 5, 13 -> 5; (0,1) 0 -> 0; (1,0) 10, 0, 10 -> 10; (1,1) 3, 4, 2 -> 3
    b[0][0, 0] = (3, 4, 0)
    b[1][0, 0] = (0, 3, 4)
    b[2][0, 0] = (12, 5, 0)
    b[0][1, 0] = (6, 8, 0)
    b[2][1, 0] = (0, 0, 10)
    b[0][1, 1], b[1][1, 1], b[2][1, 1] = (3, 0, 0), (0, 4, 0), (0, 0, 2)
    heat, unaffected = viz.heat_map(a, b)
    np.testing.assert_allclose(heat, [[0.5, 0.0], [1.0, 0.3]], atol=1e-15)
    np.testing.assert_array_equal(unaffected, [[False, True], [False, True]])
    flat, all_unaffected = viz.heat_map(a, a)  # max = min: all zero, every pixel unaffected
    assert not flat.any() and all_unaffected.all()


def test_interpolation_composition_and_regions():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 4, 5, 6))
    np.testing.assert_array_equal(viz.interpolate(a, b, 0.0), a)
    np.testing.assert_array_equal(viz.interpolate(a, b, 1.0), b)
    np.testing.assert_allclose(viz.interpolate(a, b, 0.25), 0.75 * a + 0.25 * b)
    with pytest.raises(ValueError, match=r"alpha=1\.5: must lie in \[0, 1\]"):
        viz.interpolate(a, b, 1.5)
    composed = viz.compose(a, b, (1, 3, 2, 6))
    inside = np.zeros((5, 6), bool)
    inside[1:3, 2:6] = True
    np.testing.assert_array_equal(composed[:, inside], b[:, inside])
    np.testing.assert_array_equal(composed[:, ~inside], a[:, ~inside])
    for region in ((0, 6, 0, 2), (2, 2, 0, 2), (0, 1, -1, 2)):  # outside, empty, negative
        with pytest.raises(ValueError, match=r"outside the 5×6 feature grid"):
            viz.compose(a, b, region)
    # pixel footprint on an 8×8 image of a 4×4 grid: 2 pixels per cell
    pixels = viz.region_pixels((1, 3, 0, 2), (4, 4), 8)
    expected = np.zeros((8, 8), bool)
    expected[2:6, 0:4] = True
    np.testing.assert_array_equal(pixels, expected)
    assert viz.central_region((9, 9)) == (2, 7, 2, 7)


# -- with FeatInv ----------------------------------------------------------------------------------

def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """A "trained" ControlNet: weights moved off their (zero-conv) initialisation, so features steer the image."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def test_interpolation_ends_reproduce_the_reconstructions_of_a_and_b(single_torch_thread):
    torch.manual_seed(0)
    pipe = loading.build_featinv(loading.tiny_base_components(seed=0), feature_channels=8, encoder_hidden_channels=16)
    perturb(pipe.controlnet, seed=1, scale=0.5)  # enough for the two maps to give clearly different images
    pipe.set_progress_bar_config(disable=True)
    a, b = np.random.default_rng(4).normal(size=(2, 8, 5, 5)).astype(np.float32)

    def images(maps):
        return np.stack([np.asarray(im) for im in pipe(torch.from_numpy(np.stack(maps)), seeded_generators([7, 7]),
                                                       num_inference_steps=2).images])

    ends = images([viz.interpolate(a, b, 0.0), viz.interpolate(a, b, 1.0)]).astype(int)
    direct = images([a, b]).astype(int)
    # Same maps, same seeds, same batch: the same images, up to a grey level of float rounding in the
    # uint8 conversion (interpolate's ends are the maps exactly, tested above).
    assert np.abs(ends - direct).max() <= 1
    # And the two maps do steer the sample: far more than rounding apart.
    assert np.abs(ends[0] - ends[1]).mean() > 5, np.abs(ends[0] - ends[1]).mean()


FEATINV = {"base_model": "tiny", "encoder_hidden_channels": 16, "sampling": {"steps": 2, "batch_size": 8},
           "viz": {"n_concepts": 2, "rank": 2, "num_seeds": 2, "alphas": [0, 0.5, 1], "limit": 2}}


@pytest.fixture(scope="module")
def viz_setup(tmp_path_factory, ray_session):
    """4 images of one class, extracted with the tiny ConvNeXt (stage3: 64 × 9 × 9), and a perturbed tiny FeatInv."""
    root = tmp_path_factory.mktemp("data")
    for i in range(4):
        write_image(root / "images" / "test" / "bird" / f"{i}.png", size=(72, 64), seed=10 + i)
    tmp = tmp_path_factory.mktemp("viz")
    cfg = make_config(tmp / "store", root, featinv=FEATINV)
    ingest.run(cfg)
    extract.run(cfg)
    pipe = loading.featinv_pipeline(cfg)
    perturb(pipe.controlnet, seed=2)
    pipe.controlnet.save_pretrained(tmp / "controlnet")
    data = cfg.model_dump(mode="json")
    data["featinv"]["controlnet"] = str(tmp / "controlnet")
    path = tmp / "viz.yaml"
    path.write_text(yaml.safe_dump(data))
    return cfg, str(path), tmp


def test_bad_viz_settings_stop_before_any_work(viz_setup, monkeypatch, capsys):
    cfg, path, tmp = viz_setup
    wrong = tmp / "wrong.npy"
    np.save(wrong, np.ones((2, 1, 7)))

    def no_ray(cfg):
        raise AssertionError("Ray was started before the checks failed")

    monkeypatch.setattr(runtime, "init_ray", no_ray)
    cases = [(["featinv.viz.alphas=[0, 1.5]"], "featinv.viz.alphas", 2),
             (["featinv.viz.region=[0, 3, 5, 10]"], "featinv.viz.region [0, 3, 5, 10]", 1),
             (["featinv.viz.source_ids=[nosuch]"], "featinv.viz.source_ids: no feature maps", 1),
             (["featinv.viz.pair=[nosuch, other]"], "featinv.viz.pair: no feature maps", 1),
             (["featinv.viz.class_name=cat"], "featinv.viz.class_name: no feature maps of class 'cat'", 1),
             (["featinv.viz.class_name=bird", "featinv.viz.source_ids=[x]"], "are both set", 1),
             ([f"featinv.viz.concepts={wrong}"], f"featinv.viz.concepts: concept bases {wrong} have dimension [7]", 1)]
    for overrides, message, code in cases:
        assert cli.main(["featinv-viz", "--config", path, *overrides]) == code
        assert message in capsys.readouterr().err
    assert not (tmp / "store" / "results").exists()


def test_featinv_viz_command_writes_the_experiments(viz_setup, capsys):
    cfg, path, _ = viz_setup
    assert ray.is_initialized()
    assert cli.main(["featinv-viz", "--config", path]) == 0
    out = capsys.readouterr().out
    assert "[featinv-viz] 2 images of class 'bird' × 2 concepts" in out
    folder = Location(cfg.storage + "/results/study/featinv_viz").current().uri  # the published version
    results = json.loads(open(f"{folder}/results.json").read())
    shown, seeds = results["shown"], results["seeds"]
    # What made them: the viz settings, and the features and images groups read, as those stages recorded them.
    made = results["provenance"]
    assert made["settings"]["featinv.viz.num_seeds"] == 2 and made["settings"]["featinv.sampling.steps"] == 2
    st = tables.Store(cfg.storage)
    assert made["inputs"] == {
        "features/convnext_base/stage3#original":
            tables.read_provenance(st.layout.features("convnext_base", "stage3"))["original"]["fingerprint"],
        "images#original": tables.read_provenance(st.layout.images)["original"]["fingerprint"]}
    assert seeds == [100, 101] and len(shown) == 2 and results["composition"]["region"] == [2, 7, 2, 7]
    for sid in shown:
        for name in ["source", *(f"recon_seed{s}" for s in seeds), *(f"concept{k}_{kind}" for k in (0, 1)
                                                                      for kind in ("heat", "unaffected", "seed100"))]:
            assert Image.open(f"{folder}/concepts/{sid}/{name}.png").size[0] in (16, 64)
        assert Image.open(f"{folder}/concepts/{sid}.png").format == "PNG"
    for name in ("interpolation/strip", "interpolation/alpha_curve", "interpolation/alpha0.5_seed101",
                 "composition/grid", "composition/composed_seed100"):
        assert Image.open(f"{folder}/{name}.png").format == "PNG"

    # the alpha = 1 reconstruction's cosine, recomputed: B's map against the probe's map of the saved image
    interp = pd.read_csv(f"{folder}/interpolation.csv")
    assert sorted(set(interp["alpha"])) == [0, 0.5, 1] and len(interp) == 6
    b = results["composition"]["b"]
    phi_b = tables.tensor_numpy(st.rows(st.layout.features("convnext_base", "stage3"), [(b, "original")],
                                       ["feature"])["feature"]).astype(np.float32)
    image = np.array(Image.open(f"{folder}/interpolation/alpha1_seed100.png"))
    seen = BackboneProbe(cfg.extract.backbones[0], "stage3").features(torch.from_numpy(image[None]))
    expected = float(median_cosine(torch.from_numpy(phi_b), seen, "lower")[0])
    recorded = interp[(interp["alpha"] == 1) & (interp["seed"] == 100)]["cos_median_lower"].item()
    assert recorded == pytest.approx(expected, abs=1e-5)  # float32 backbone, same image: rounding apart

    concepts = pd.read_csv(f"{folder}/concepts.csv")
    assert len(concepts) == 4 and concepts["unaffected_fraction"].between(0, 1).all()
    assert (concepts["mean_pixel_change"] > 0).all()  # the perturbed FeatInv sees the attenuation
    comp = results["composition"]
    assert comp["change_inside"] > 0 and comp["change_outside"] >= 0

    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    run = client.search_runs([tracking.experiment_id(cfg)], "tags.`featmap.run` = 'study:featinv-viz'")[0]
    assert run.info.status == "FINISHED" and "interp_cos_alpha_0.5" in run.data.metrics
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "concepts.csv", "interpolation.csv", "concepts", "composition"} <= artefacts
