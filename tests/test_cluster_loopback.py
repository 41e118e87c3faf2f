"""A real two-node Ray cluster on loopback, with object storage and a tracking server, as on a cloud:

    moto (S3 API)  <-  MLflow tracking server (sqlite here, artefacts proxied to s3://<bucket>/mlartifacts)
    ray head (3 CPUs, cwd node_head/)  +  ray worker node (3 CPUs, cwd node_worker/, resource loopback_worker)

Every process is a child of this test, started on free ports and stopped by PID (tests/ray_cluster.py).
Credentials and the S3 endpoint reach every node only through the environment the nodes were
started with; nothing in code names them. The pipeline and a small study are submitted with
`ray job submit --working-dir .` and `storage=s3://<bucket>/featmap`, then checked: work ran on both
nodes (Ray's state API), every artefact is in the bucket and nothing on the nodes' local disks,
MLflow holds the runs, and the results equal the same config run in-process on one node.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_backbone, write_image

from tests import ray_cluster as rc

pytestmark = pytest.mark.slow

DATASET = "loop"
STUDY = "loop"
CPUS_PER_NODE = 3
WORKER_RESOURCE = "loopback_worker"
IMAGES = {"train": 3, "test": 1}  # per class, 2 classes: 8 originals, 24 image rows with 2 manipulations
RUN_KEY = f"{DATASET}--direct--convnext_base--stage3--hue_shift_60--linear--paper"


def common_overrides(storage: str, root: str) -> list[str]:
    """The same study config on the cluster and on the single node (seeds come from conf/demo.yaml)."""
    return [
        "--config", str(rc.REPO / "conf" / "demo.yaml"), f"storage={storage}",
        f"dataset.name={DATASET}", f"dataset.root={root}", "dataset.image_size=64",
        f"extract.backbones={json.dumps([tiny_backbone('convnext_base', layers=['stage3'])])}",
        "manipulate.ops={hue_shift: [60], rotation: [90]}",
        f"mapping.study={STUDY}",
        "mapping.targets=[{backbone: convnext_base, layers: [stage3], normalise: false}]",
        f"mapping.datasets={{{DATASET}: {{direct: {{manipulations: [hue_shift_60], models: [linear]}}}}}}",
        "mapping.training.max_epochs=3", "mapping.training.batch_size=4",
        "evaluate.truncation_ranks=[1, 4]", "evaluate.analysis_samples=4",
    ]


# -- the cluster -------------------------------------------------------------------------------------

class Loopback:
    """What the tests need to know about the running cluster."""

    def __init__(self, work: Path):
        self.work = work
        self.bucket = f"fm-loop-{secrets.token_hex(4)}"
        self.node_dirs = {"head": work / "node_head", "worker": work / "node_worker"}
        self.sources = work / "sources"  # the same image files, uploaded and local
        self.storage = f"s3://{self.bucket}/featmap"
        self.root = f"s3://{self.bucket}/sources/{DATASET}"
        self.servers: list = []

    def job_overrides(self) -> list[str]:
        return [*common_overrides(self.storage, self.root), f"mlflow.tracking_uri={self.tracking_uri}"]

    def s3(self):
        import pyarrow.fs as pafs

        return pafs.FileSystem.from_uri(f"s3://{self.bucket}/")[0]

    def objects(self, prefix: str) -> list[str]:
        """Keys under s3://<bucket>/<prefix>/, relative to it."""
        import pyarrow.fs as pafs

        base = f"{self.bucket}/{prefix}"
        infos = self.s3().get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return sorted(i.path.removeprefix(base + "/") for i in infos if i.type == pafs.FileType.File)


def _write_sources(root: Path) -> None:
    """FeatMap layout, 2 classes x (3 train + 1 test) deterministic random-texture PNGs."""
    seed = 0
    for cls in ("b_cls", "a_cls"):
        for split, n in IMAGES.items():
            for i in range(n):
                write_image(root / "images" / split / cls / f"{i:05d}.png", seed=seed)
                seed += 1


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, ray_session):
    """Started after the session's embedded Ray (`ray_session`, used by the single-node run), so that
    instance never inherits this module's S3 variables, which point at a server that stops with it."""
    import boto3
    import pyarrow.fs as pafs

    t0 = time.monotonic()
    lb = Loopback(tmp_path_factory.mktemp("loopback"))
    lb.repo_before = repo_state()
    for d in lb.node_dirs.values():
        d.mkdir()
    _write_sources(lb.sources)
    with pytest.MonkeyPatch.context() as mp:
        try:
            moto, endpoint = rc.start_moto(lb.work)
            lb.servers.append(moto)
            s3 = rc.s3_env(endpoint)
            for k, v in s3.items():  # this process reads the bucket (Lance, pyarrow, boto3) the same way
                mp.setenv(k, v)
            boto3.client("s3").create_bucket(Bucket=lb.bucket)
            pafs.copy_files(str(lb.sources), lb.root.removeprefix("s3://"), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=lb.s3())

            # MLflow and the head start side by side (each takes ~20 s on 2 cores).
            mlflow_server, lb.tracking_uri = rc.start_mlflow(lb.work, rc.clean_env(**s3),
                                                             f"s3://{lb.bucket}/mlartifacts", wait=False)
            lb.servers.append(mlflow_server)
            lb.env = rc.ray_env(**s3)
            lb.head = rc.start_head(lb.env, cwd=lb.node_dirs["head"], num_cpus=CPUS_PER_NODE, wait=False)
            lb.servers.append(lb.head)
            lb.head.wait_ready()
            lb.worker = rc.start_worker(lb.env, lb.head.gcs_address, cwd=lb.node_dirs["worker"], num_cpus=CPUS_PER_NODE,
                                        resources={WORKER_RESOURCE: 100})
            lb.servers.append(lb.worker)
            mlflow_server.wait_ready()
            lb.dashboard = lb.head.dashboard

            def two_nodes():
                alive = [n for n in rc.ray_list(lb.env, lb.dashboard, "nodes") if n["state"] == "ALIVE"]
                lb.nodes = {"head" if n["is_head_node"] else "worker": n["node_id"] for n in alive}
                return len(alive) == 2 and set(lb.nodes) == {"head", "worker"}

            rc.wait_until("two alive Ray nodes", two_nodes, timeout=120,
                          servers=(lb.head.server, lb.worker.server, mlflow_server))
            print(f"\n[loopback] moto, MLflow and 2 Ray nodes up in {time.monotonic() - t0:.0f} s: {lb.nodes}")
            yield lb
        finally:
            t1 = time.monotonic()
            errors = []
            for server in reversed(lb.servers):  # worker node, head, MLflow, moto
                try:
                    server.stop()
                except Exception as e:  # stop the others regardless
                    errors.append(e)
            killed = {s.name: s.stopped for s in (x.server if isinstance(x, rc.RayNode) else x for x in lb.servers)}
            print(f"\n[loopback] stopped in {time.monotonic() - t1:.0f} s; SIGKILLed survivors: {killed}")
            if errors:
                raise errors[0]


def submit(lb: Loopback, name: str, script: str, *overrides: str) -> dict:
    submission_id = f"{name}-{secrets.token_hex(3)}"
    t0 = time.monotonic()
    done = rc.submit(lb.dashboard, lb.env, "python", script, *lb.job_overrides(), *overrides,
                     submission_id=submission_id)
    job = {"submission_id": submission_id, "returncode": done.returncode, "log": done.stdout + done.stderr,
           "seconds": time.monotonic() - t0}
    (lb.work / f"{name}-job.log").write_text(job["log"])
    print(f"\n[loopback] {name} job: {job['seconds']:.0f} s, exit {done.returncode}, log in {lb.work}/{name}-job.log")
    return job


def job_info(lb: Loopback, job: dict) -> dict:
    """The job's entry in Ray's state API (status, job_id, ...)."""
    return next(j for j in rc.ray_list(lb.env, lb.dashboard, "jobs") if j.get("submission_id") == job["submission_id"])


def check_succeeded(lb: Loopback, job: dict) -> None:
    status = job_info(lb, job)["status"]
    assert job["returncode"] == 0 and status == "SUCCEEDED", (
        f"job {job['submission_id']}: {status}, exit {job['returncode']}:\n{job['log'][-20000:]}")


@pytest.fixture(scope="module")
def pipeline_job(cluster):
    return submit(cluster, "pipeline", "jobs/pipeline.py")


@pytest.fixture(scope="module")
def study_job(cluster, pipeline_job):
    if pipeline_job["returncode"] != 0:
        pytest.fail("the pipeline job failed: no study without its tables")
    # The study's Tune trials (each drives one fused group's TorchTrainer) must run on the worker node
    # (mapping.resources.driver_resources), the job's driver runs on the head: what the trials publish
    # reaches the driver's evaluate/analyze/report steps only through the bucket.
    return submit(cluster, "study", "jobs/study.py", f"mapping.resources.driver_resources={{{WORKER_RESOURCE}: 0.01}}")


# -- the same config on one node, in-process -----------------------------------------------------------

@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory, ray_session):
    """The same pipeline, on local storage in this process's embedded Ray (the session's one)."""
    from featmap_ray import cli

    storage = tmp_path_factory.mktemp("single_node") / "featmap"
    args = common_overrides(str(storage), str(cluster.sources))
    t0 = time.monotonic()
    assert cli.main(["pipeline", *args]) == 0
    print(f"\n[loopback] single-node pipeline: {time.monotonic() - t0:.0f} s")
    return storage, args


@pytest.fixture(scope="module")
def reference_study(reference):
    from featmap_ray import cli

    storage, args = reference
    t0 = time.monotonic()
    assert cli.main(["study", *args]) == 0
    print(f"\n[loopback] single-node study: {time.monotonic() - t0:.0f} s")
    return storage


# -- reading both --------------------------------------------------------------------------------------

def images_by_key(uri: str) -> dict[tuple[str, str], dict]:
    import lance

    rows = lance.dataset(uri).to_table().to_pylist()
    return {(r["source_id"], r["variant"]): r for r in rows}


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)))


def features_by_key(uri: str) -> tuple[list[tuple[str, str]], np.ndarray]:
    import lance

    table = lance.dataset(uri).to_table(columns=["source_id", "variant", "feature"])
    keys = list(zip(table["source_id"].to_pylist(), table["variant"].to_pylist()))
    values = table["feature"].combine_chunks().to_numpy_ndarray()
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return [keys[i] for i in order], values[order]


def placement(lb: Loopback, job: dict) -> dict[str, Counter]:
    """Where the job's tasks and actors ran (Ray's state API on the head): kind -> Counter of node."""
    info = job_info(lb, job)
    job_id = info["job_id"]
    names = {v: k for k, v in lb.nodes.items()}
    tasks = rc.ray_list(lb.env, lb.dashboard, "tasks", f"job_id={job_id}")
    actors = rc.ray_list(lb.env, lb.dashboard, "actors", f"job_id={job_id}")
    where = {"tasks": Counter(), "actors": Counter(), "driver": names.get(info.get("driver_node_id"))}
    for t in tasks:
        if t.get("node_id"):
            where["tasks"][(names.get(t["node_id"], t["node_id"]), t["type"])] += 1
    for a in actors:
        if a.get("node_id"):
            where["actors"][(names.get(a["node_id"], a["node_id"]), a["class_name"])] += 1
    return where


# -- the pipeline --------------------------------------------------------------------------------------

def test_pipeline_job_succeeds(cluster, pipeline_job):
    check_succeeded(cluster, pipeline_job)


def test_pipeline_ran_on_both_nodes(cluster, pipeline_job):
    where = placement(cluster, pipeline_job)
    print(f"\n[loopback] pipeline placement: {where}")
    nodes = {node for node, _ in where["tasks"]}
    assert nodes == {"head", "worker"}, where
    assert where["driver"] == "head"  # `ray job submit` runs the entrypoint on the head


def test_pipeline_tables_are_in_the_bucket(cluster, pipeline_job):
    objects = cluster.objects("featmap")
    tables = {o.split(".lance/")[0] + ".lance" for o in objects if ".lance/" in o}
    assert {"images.lance", "features/convnext_base/stage3.lance"} <= tables, objects
    assert not [o for o in objects if ".lance/" not in o
                and not o.startswith(("mapping/", "results/", "reports/", "logs/"))], objects


def test_pipeline_equals_a_single_node_run(cluster, pipeline_job, reference):
    storage, _ = reference
    got = images_by_key(f"{cluster.storage}/images.lance")
    want = images_by_key(str(storage / "images.lance"))
    assert sorted(got) == sorted(want) and len(got) == 2 * sum(IMAGES.values()) * 3
    for key, row in got.items():
        ref = want[key]
        assert row["source_path"] == f"{cluster.root}/" + ref["source_path"].removeprefix(f"{cluster.sources}/")
        assert {k: v for k, v in row.items() if k not in ("image", "source_path")} == {
            k: v for k, v in ref.items() if k not in ("image", "source_path")}, key
        np.testing.assert_array_equal(pixels(row["image"]), pixels(ref["image"]), err_msg=str(key))

    keys, got_f = features_by_key(f"{cluster.storage}/features/convnext_base/stage3.lance")
    ref_keys, want_f = features_by_key(str(storage / "features" / "convnext_base" / "stage3.lance"))
    assert keys == ref_keys == sorted(want)
    # float16 storage of float32 forward passes. Ray Data batches the images differently on two nodes
    # than on one (extract.batch_size rows per batch, blocks split by node), and CPU kernels may pick
    # another blocking for another batch size: float32 results then differ in their last bits, which
    # moves a float16 value by at most one unit in the last place (2^-10 relative). Bound: 1% of the
    # features' magnitude, far below any real difference (a wrong image or layer changes them by O(1)).
    # Measured here: bit-equal; Ray Data guarantees no batch composition, hence the bound.
    diff = np.abs(got_f.astype(np.float32) - want_f.astype(np.float32))
    scale = float(np.abs(want_f.astype(np.float32)).max())
    print(f"\n[loopback] features: {np.mean(diff == 0):.1%} of values bit-equal, max |diff| {diff.max():.3g} "
          f"(max |value| {scale:.3g})")
    assert diff.max() <= 1e-2 * scale


# -- nothing on local disks ------------------------------------------------------------------------------

FORBIDDEN = ("featmap_data", "mlruns", "mlflow.db", "mlartifacts")


def _forbidden(root: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Paths under `root` that an artefact written to local disk instead of the bucket would leave:
    a storage or tracking folder, a Lance table, a folder named `s3:` (an s3:// URI taken as a path).
    Top-level folders named in `skip` are not searched."""
    found = []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d not in skip]
        for name in [*dirs, *files]:
            if name in FORBIDDEN or name.startswith("s3:") or name.endswith(".lance"):
                found.append(str(rel / name))
        dirs[:] = [d for d in dirs if d not in FORBIDDEN and not d.startswith("s3:") and not d.endswith(".lance")]
    return sorted(found)


REPO_SKIP = (".venv", ".git", ".tools", ".pytest_cache", "featmap_data")  # featmap_data: `make demo`'s


def repo_state() -> tuple[list[str], bool]:
    return _forbidden(rc.REPO, REPO_SKIP), rc.REPO.joinpath("featmap_data").exists()


def check_nothing_local(lb: Loopback) -> None:
    # The nodes' working folders: Ray itself puts nothing there (its files go to --temp-dir).
    for name, folder in lb.node_dirs.items():
        assert not list(folder.rglob("*")), (name, sorted(str(p) for p in folder.rglob("*")))
    # The nodes' temp dirs hold the jobs' working dirs, the CWD of their drivers and workers.
    for node in (lb.head, lb.worker):
        assert not _forbidden(node.temp_dir), (node.server.name, _forbidden(node.temp_dir))
    # Nor in the repository the jobs were submitted from (and the single-node run ran in).
    assert repo_state() == lb.repo_before


def test_pipeline_wrote_nothing_locally(cluster, pipeline_job):
    check_nothing_local(cluster)


# -- the study -----------------------------------------------------------------------------------------

def test_study_job_succeeds(cluster, study_job):
    check_succeeded(cluster, study_job)
    assert "FAILED" not in study_job["log"], study_job["log"][-20000:]


def test_study_ran_on_both_nodes(cluster, study_job):
    where = placement(cluster, study_job)
    print(f"\n[loopback] study placement: {where}")
    assert {node for node, _ in where["tasks"]} == {"head", "worker"}, where
    assert where["driver"] == "head"
    # Tune's trial actors asked for the worker's resource: they ran there, the driver on the head.
    # The state API names the trial class "ImplicitFunc" or "wrap_function.<locals>.ImplicitFunc".
    trials = [(node, cls) for node, cls in where["actors"] if cls.rsplit(".", 1)[-1] in ("ImplicitFunc", "_trial")]
    assert trials and {node for node, _ in trials} == {"worker"}, where


def test_study_artefacts_are_in_the_bucket(cluster, study_job):
    from featmap_ray.io.files import Location

    objects = cluster.objects("featmap")
    run = f"mapping/runs/{STUDY}/{RUN_KEY}"
    version = Location(f"{cluster.storage}/{run}").current().name  # versioned folders: the published version
    assert {f"{run}/{version}/run.json", f"{run}/{version}/model.safetensors"} <= set(objects), objects
    tables = {o.split(".lance/")[0] + ".lance" for o in objects if ".lance/" in o}
    assert {f"results/{STUDY}/evaluations.lance", f"results/{STUDY}/svd.lance"} <= tables, objects
    report = Location(f"{cluster.storage}/reports/{STUDY}").current().name
    assert f"reports/{STUDY}/{report}/report.md" in objects, objects
    assert any(o.startswith("mapping/tune/") for o in objects), objects  # Tune's experiment state
    assert cluster.objects("mlartifacts"), "no MLflow artefacts in the bucket"
    prefixes = Counter("/".join(o.split("/")[:2 if o.startswith(("mapping/", "results/", "reports/")) else 1])
                       for o in objects)
    print(f"\n[loopback] s3://{cluster.bucket}/featmap: {dict(sorted(prefixes.items()))}; "
          f"mlartifacts: {len(cluster.objects('mlartifacts'))} objects")


def test_mlflow_server_has_the_runs(cluster, pipeline_job, study_job):
    from mlflow import MlflowClient

    client = MlflowClient(cluster.tracking_uri)
    experiment = client.get_experiment_by_name("featmap")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    by_name = {r.info.run_name: r for r in runs}
    stages = [f"{STUDY}:{stage}" for stage in ("fit", "evaluate", "analyze", "report")]
    assert {"ingest", "manipulate", "extract", STUDY, *stages, RUN_KEY} <= set(by_name), sorted(by_name)
    assert {by_name[n].info.status for n in ("ingest", "manipulate", "extract", *stages, RUN_KEY)} == {"FINISHED"}
    # study -> stage -> mapping run, as the UI nests them
    assert {by_name[n].data.tags["mlflow.parentRunId"] for n in stages} == {by_name[STUDY].info.run_id}
    mapping_run = by_name[RUN_KEY]
    assert mapping_run.data.tags["mlflow.parentRunId"] == by_name[f"{STUDY}:fit"].info.run_id
    # The metrics the worker node's trial logged are the published run's.
    from featmap_ray.mapping.artefacts import read_info

    info = read_info(f"{cluster.storage}/mapping/runs/{STUDY}/{RUN_KEY}")
    assert mapping_run.data.metrics["final_val_loss"] == pytest.approx(info["best"]["val_loss"])
    history = client.get_metric_history(mapping_run.info.run_id, "val_loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [h["val_loss"] for h in info["history"]])
    # Artefacts go through the server (mlflow-artifacts:/) into the bucket.
    artefacts = cluster.objects("mlartifacts")
    for name in ("ingest", RUN_KEY):
        run = by_name[name]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        listed = [a.path for a in client.list_artifacts(run.info.run_id)]
        assert listed, name
        assert any(f"/{run.info.run_id}/artifacts/" in o for o in artefacts), (name, artefacts)


def test_study_equals_a_single_node_run(cluster, study_job, reference_study):
    import lance

    from featmap_ray.mapping.artefacts import read_info

    got = read_info(f"{cluster.storage}/mapping/runs/{STUDY}/{RUN_KEY}")
    want = read_info(reference_study / "mapping" / "runs" / STUDY / RUN_KEY)
    assert (got["train_pairs"], got["val_pairs"], got["best_epoch"]) == (
        want["train_pairs"], want["val_pairs"], want["best_epoch"])
    assert got["shape"] == want["shape"] and len(got["history"]) == len(want["history"])
    # Same features (see above), same seeds (mapping.training.seed: initialisation, split, batch order):
    # what may still differ is the order of float32 reductions (another thread count on another
    # node), relative ~1e-6 per epoch; rtol 1e-3 bounds that over 3 epochs and is far below what a
    # different split, batch order or initialisation changes (the losses move by ~1e-2 per epoch here).
    metrics = ("train_loss", "val_loss", "val_mse", "val_cos_median_upper")
    g = np.array([[h[k] for k in metrics] for h in got["history"]])
    w = np.array([[h[k] for k in metrics] for h in want["history"]])
    print(f"\n[loopback] study: final {dict(zip(metrics, g[-1].round(6).tolist()))}; max relative difference to the "
          f"single-node run {np.max(np.abs(g - w) / np.maximum(np.abs(w), 1e-12)):.2g}")
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-6)

    cols = ["run", "cos_median_upper", "cos_mean", "mse", "agree_top1_orig_mapped", "n_samples"]
    got_e = lance.dataset(f"{cluster.storage}/results/{STUDY}/evaluations.lance").to_table(columns=cols).to_pandas()
    want_e = lance.dataset(str(reference_study / "results" / STUDY / "evaluations.lance")).to_table(
        columns=cols).to_pandas()
    got_e, want_e = (f.sort_values("run").reset_index(drop=True) for f in (got_e, want_e))
    assert list(got_e["run"]) == list(want_e["run"])
    for c in cols[1:]:
        np.testing.assert_allclose(got_e[c].to_numpy(float), want_e[c].to_numpy(float), rtol=1e-3, atol=1e-6,
                                   err_msg=c)


def test_study_wrote_nothing_locally(cluster, study_job):
    check_nothing_local(cluster)
