"""The fused epoch loop without Ray: a model trained in a group is the model trained alone, the kept
weights are the best epoch's, a failing model does not stop the others, and the state resumes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from featmap_ray.config import MappingTraining
from featmap_ray.cosine import median_cosine
from featmap_ray.io import tables
from featmap_ray.mapping import loop
from featmap_ray.mapping.grid import RunSpec
from featmap_ray.stages import mapping_train
from featmap_ray.stages import pairs as data
from featmap_ray.stages import synthetic as mt

SHAPE = (8, 3, 3)
CPU = torch.device("cpu")
PAPER = {"mse": 0.3, "median_cos": 0.7}
# Every family of the registry, and a stochastic loss (ntxent draws negatives from its generator).
FAMILIES = [("linear", {}), ("additive", {}), ("local_nonshared_linear", {}), ("mlp", {"hidden": 8}),
            ("cnn", {"hidden": 8}), ("transformer", {"hidden": 8, "num_heads": 2, "num_layers": 1}),
            ("ridge", {}), ("orthogonal_procrustes", {})]


def spec(model: str, hparams: dict | None = None, loss: dict | None = None, manipulation: str = "hue_shift_60",
         normalise: bool = False) -> RunSpec:
    loss = loss or PAPER
    return RunSpec("t", "g", mt.BACKBONE, mt.LAYER, manipulation, model, "+".join(loss), loss, False, normalise,
                   hparams or {})


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, single_torch_thread):
    root = tmp_path_factory.mktemp("loop")
    mt.write_tables(str(root), shape=SHAPE, n_train=40, n_test=4)
    loaded = data.load_pairs(tables.Store(str(root)), dataset="t", backbone=mt.BACKBONE, layer=mt.LAYER,
                             manipulation="hue_shift_60", split="train")
    return data.train_val_split(loaded, 0.2, seed=0)


def members(specs, training, shape=SHAPE, norm=None):
    return [loop.Member(s, s.key, training, shape=shape, norm=norm, loss_options={}, device=CPU) for s in specs]


def loaders(pairs, batch_size=8, cache=True):
    train, val = pairs
    cache_bytes = 1 << 30 if cache else 0
    return (data.PairLoader(train, batch_size=batch_size, shuffle_seed=3, cache_bytes=cache_bytes),
            data.PairLoader(val, batch_size=batch_size, cache_bytes=cache_bytes))


def assert_same_weights(a: dict, b: dict) -> None:
    # The same operations on the same data in the same process; different objects may still take
    # other kernel paths (~1e-6 per step), which a few Adam steps can amplify: 1e-4 relative.
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5, msg=k)


def test_a_model_trained_in_a_group_equals_it_trained_alone(pairs):
    training = MappingTraining(max_epochs=4, patience=4, lr=1e-2, batch_size=8, accumulate=2)
    specs = [spec(m, hp) for m, hp in FAMILIES] + [spec("mlp", {"hidden": 8}, loss={"ntxent": 1.0})]
    group = members(specs, training)
    fit = loop.fit_group(group, *loaders(pairs), CPU)
    assert all(m.status == "stopped" for m in group), [(m.key, m.error) for m in group]
    for m in group:
        [alone] = members([m.spec], training)
        loop.fit_group([alone], *loaders(pairs, cache=False), CPU)  # and streamed instead of cached
        assert alone.best_epoch == m.best_epoch and len(alone.history) == len(m.history), m.key
        assert_same_weights(alone.best_state, m.best_state)
        assert alone.best["val_loss"] == pytest.approx(m.best["val_loss"], rel=1e-5)
    # Closed-form families take one pass; trained ones every epoch.
    assert {m.spec.model: len(m.history) for m in group if m.closed_form} == {"ridge": 1, "orthogonal_procrustes": 1}
    assert {len(m.history) for m in group if m.trainable} == {4}
    assert set(fit.baselines) == {"identity"}  # hue shift: no spatial-only baseline


def test_the_kept_weights_are_the_reported_epoch(pairs):
    """min_delta decides early stopping only: with a min_delta no epoch can beat, training stops after
    `patience` epochs, and the kept model is still the lowest validation loss, as reported."""
    training = MappingTraining(max_epochs=20, patience=3, min_delta=1e3, lr=1e-2, batch_size=8, accumulate=1)
    [m] = members([spec("linear")], training)
    loop.fit_group([m], *loaders(pairs), CPU)
    losses = [h["val_loss"] for h in m.history]
    assert len(losses) == 4  # epoch 0 sets the reference, then 3 epochs without a 1e3 improvement
    assert m.best_epoch == int(np.argmin(losses)) and m.best_epoch > 0  # learning went on after epoch 0
    assert m.best == m.history[m.best_epoch]
    # The kept weights give the reported validation loss (independently recomputed).
    model = m.best_model()
    _, val = pairs
    x, y = (torch.from_numpy(a.astype(np.float32)) for a in val.read(np.arange(len(val))))
    with torch.no_grad():
        recomputed = float(m.loss(model(x), y))
    assert recomputed == pytest.approx(m.best["val_loss"], rel=1e-4)


def test_a_failing_model_does_not_stop_the_others(pairs):
    training = MappingTraining(max_epochs=2, patience=2, lr=1e-2, batch_size=8, accumulate=1)
    good, bad = members([spec("linear"), spec("mlp", {"hidden": 8})], training)
    bad.optimiser.param_groups[0]["lr"] = 1e30  # after the first step, squared errors overflow
    loop.fit_group([good, bad], *loaders(pairs), CPU)
    assert good.status == "stopped" and len(good.history) == 2
    assert bad.status == "failed" and "epoch 0, step 2" in bad.error and "not finite" in bad.error


def test_non_finite_data_fails_the_group_naming_the_image(tmp_path, single_torch_thread):
    mt.write_tables(str(tmp_path), shape=SHAPE, n_train=12, n_test=2, nan_key=("t0005", "hue_shift_60"))
    loaded = data.load_pairs(tables.Store(str(tmp_path)), dataset="t", backbone=mt.BACKBONE, layer=mt.LAYER,
                             manipulation="hue_shift_60", split="train")
    group = members([spec("linear"), spec("ridge")], MappingTraining(max_epochs=2, batch_size=4))
    loop.fit_group(group, *loaders(data.train_val_split(loaded, 0.2, 0), batch_size=4), CPU)
    assert [m.status for m in group] == ["failed", "failed"]
    assert all("t0005" in m.error for m in group)


def test_a_resumed_group_ends_as_an_uninterrupted_one(pairs, tmp_path):
    training = MappingTraining(max_epochs=5, patience=5, lr=1e-2, batch_size=8, accumulate=2)
    specs = [spec("mlp", {"hidden": 8}), spec("ridge"), spec("linear", loss={"ntxent": 1.0})]
    straight = members(specs, training)
    loop.fit_group(straight, *loaders(pairs), CPU)

    first = members(specs, training)
    fit = loop.GroupFit(first, *loaders(pairs), CPU)
    for _ in range(2):
        fit.epoch()
    # Through the checkpoint file Ray Train keeps, read as data only (torch.load weights_only=True).
    mapping_train.write_group_state(tmp_path / "group.pt", first, fit)
    state = mapping_train.read_group_state(tmp_path / "group.pt")
    saved = state["members"], state["fit"]
    second = members(specs, training)  # a fresh process: new objects, state from the checkpoint
    for m in second:
        m.load_state_dict(saved[0][m.digest])
    fit = loop.GroupFit(second, *loaders(pairs), CPU, state=saved[1])
    while fit.active:
        fit.epoch()
    # Ridge finished in epoch 0 (and was published): the checkpoint keeps only that fact.
    assert second[1].status == "stopped" and saved[0][second[1].digest] == {"digest": second[1].digest,
                                                                              "status": "stopped"}
    for a, b in zip(straight[::2], second[::2]):
        assert [h["epoch"] for h in a.history] == [h["epoch"] for h in b.history]
        assert_same_weights(a.best_state, b.best_state)
    assert second[0].resumed_at == [2]


def test_train_means_and_baselines_follow_their_definitions(pairs):
    group = members([spec("ridge")], MappingTraining(max_epochs=1, batch_size=8))
    train_loader, val_loader = loaders(pairs)
    fit = loop.fit_group(group, train_loader, val_loader, CPU)
    train, val = pairs
    x, y = train.read(np.arange(len(train)))
    np.testing.assert_allclose(fit.train_means["x"], x.astype(np.float64).mean((0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(fit.train_means["y"], y.astype(np.float64).mean((0, 2, 3)), rtol=1e-6)
    vx, vy = (torch.from_numpy(a.astype(np.float32)) for a in val.read(np.arange(len(val))))
    identity = fit.baselines["identity"]
    assert identity["val_cos_median_upper"] == pytest.approx(float(median_cosine(vx, vy, "upper").mean()), rel=1e-6)
    assert identity["val_mse"] == pytest.approx(float((vx - vy).pow(2).mean()), rel=1e-6)


def test_pair_loader_order_depends_on_seed_and_epoch_only(pairs):
    train, _ = pairs
    cached = data.PairLoader(train, batch_size=5, shuffle_seed=7, cache_bytes=1 << 30)
    streamed = data.PairLoader(train, batch_size=5, shuffle_seed=7)
    for epoch in (0, 1):
        a, b = list(cached.batches(epoch)), list(streamed.batches(epoch))
        assert len(a) == len(b) == math.ceil(len(train) / 5)
        for (ra, xa, ya), (rb, xb, yb) in zip(a, b):
            # Stored values read back: exact equality is the right test.
            assert torch.equal(ra, rb) and torch.equal(xa, xb) and torch.equal(ya, yb)
    rows = [torch.cat([r for r, _, _ in cached.batches(e)]) for e in (0, 1)]
    assert sorted(rows[0].tolist()) == list(range(len(train))) and rows[0].tolist() != rows[1].tolist()
    # Two workers: disjoint shards, the same number of steps.
    shards = [data.PairLoader(train, batch_size=4, rank=r, world=2, shuffle_seed=7) for r in (0, 1)]
    seen = [torch.cat([r for r, _, _ in s.batches(0)]) for s in shards]
    assert len(seen[0]) == len(seen[1]) == len(train) // 2 and not set(seen[0].tolist()) & set(seen[1].tolist())
