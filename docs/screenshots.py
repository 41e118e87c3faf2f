"""The docs' images, made from the demo's real outputs by a script, so that none goes stale by hand
(`make docs-screenshots`, issue 21). Under docs/img/ (--out):

    mlflow-compare.png       MLflow's run comparison of the study's mapping runs (`mlflow ui` on the demo's
                             mlflow.db, on a free loopback port)
    ray-dashboard.png        the Ray dashboard's page of a job while it runs: `featmap extract` on a copy of the
                             demo's images table (so the demo's own tables are not touched), with the dashboard on
    reconstruction-page.png  the service's page (`featmap serve`) after an upload of a demo photograph, with its
                             reconstructions for three seeds and their metrics (1400 wide, as tall as the page)
    report-figure.png        the report's headline figure (median cosine of each mapping model to the true edited
                             features, per manipulation), as `featmap report` drew it
    demo-result.png          for the README: demo photographs, their manipulation (rotation_90), and FeatInv's
                             reconstructions of the true and of the mapped feature maps (recon-eval's table), with
                             a caption drawn into the image saying what the models are (random backbone weights, a
                             FeatInv trained on these photographs for minutes)

When the demo's outputs are missing it runs `featmap demo` first (which skips what is stored and up to date).
The browser shots use Selenium with Debian's headless Chromium (`make browser`). Every process this starts (the
demo, `mlflow ui`, the stage, the service) runs in a process group of its own, stopped by its id when its shot is
taken or anything fails; their output goes to <storage>/logs/screenshots-<time>/ (with the page a wait timed out
on). Each image gets --tries attempts: on a busy machine, Ray's start can time out (30 s, fixed in Ray).

    python docs/screenshots.py [--out docs/img] [--config conf/demo.yaml] [--data featmap_data] [--only NAME ...]
                               [--demo] [--tries 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/lib/chromium/chromium")  # the real binary: /usr/bin/chromium is a wrapper script
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1400, 900)
MAX_BYTES = 300_000  # per PNG
SHOTS = ("report-figure", "demo-result", "mlflow-compare", "reconstruction-page", "ray-dashboard")  # in this order
CHILD_STAGE = "--stage-with-dashboard"  # this script, run as the child that runs a stage (ray-dashboard)
DASHBOARD_STAGE = "extract"
UPLOAD_SOURCE = "chelsea"  # the demo photograph uploaded to the page (a substring of its file name)
PAGE_SEEDS = "100, 101, 102"
PLOT_PARAMS = ("spec.manipulation", "spec.model")  # the compare page's parallel-coordinates axes
PLOT_METRICS = ("eval_cos_median_upper",)
RETRY_PAUSE_S = 30  # between attempts at one image: a busy machine's load may pass
FAILED_SHOTS: Path | None = None  # where a wait that times out saves the page (the run's log folder)
# demo-result.png: the first (manipulation, mapping model) of these that recon-eval reconstructed, its first sources
# (colour photographs first), and the caption drawn under them.
RESULT_PAIRS = (("rotation_90", "linear"), ("mask_big_square_center", "ridge"), ("hue_shift_60", "linear"))
RESULT_SOURCES = 3
CAPTION = ("The demo's models (conf/demo.yaml): ConvNeXt-atto with random weights, as nothing can be downloaded "
           "here; the mapping model fitted on the demo's training photographs; FeatInv (a tiny Stable Diffusion and "
           "ControlNet) trained for minutes on these test photographs, at 64 px. A check that the pipeline runs end "
           "to end, not a result.")


def log(message: str) -> None:
    print(f"[screenshots] {message}", flush=True)


# -- child processes --------------------------------------------------------------------------------------

class Child:
    """A command in a session (process group) of its own, its output copied to a log file and kept for
    `wait_for`. `stop()` ends it by its id (SIGTERM, then SIGKILL), then whatever it left in its group."""

    def __init__(self, name: str, argv: list[str], logs: Path, stdin: bool = False, echo: str | None = None,
                 env: dict[str, str] | None = None, whole_group: bool = False, grace: float = 60):
        self.name = name
        self.whole_group, self.grace = whole_group, grace
        self.echo = re.compile(echo) if echo else None
        self.log = logs / f"{name}.log"
        self.lines: list[str] = []
        self._file = self.log.open("a")  # a second try adds to the first one's
        log(f"{name}: {' '.join(argv)}  (output: {self.log})")
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1, start_new_session=True, env={**child_env(), **(env or {})},
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._file.write(line)
            self._file.flush()
            if self.echo is not None and self.echo.match(line):
                print(f"  {self.name}: {line.rstrip()}", flush=True)

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.lines[-n:])

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first output line matching `pattern`; an error (with the output's tail) if the process ends
        or `timeout` seconds pass first."""
        regex, deadline, seen = re.compile(pattern), time.monotonic() + timeout, 0
        while True:
            while seen < len(self.lines):
                if match := regex.search(self.lines[seen]):
                    return match
                seen += 1
            if self.proc.poll() is not None:
                self._reader.join(5)
                if seen < len(self.lines):
                    continue
                raise RuntimeError(f"{self.name} ended (exit {self.proc.returncode}) before printing "
                                   f"/{pattern}/:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} printed no /{pattern}/ in {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.2)

    def wait(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self) -> None:
        """SIGTERM to it (`whole_group`: to every process of its group), SIGKILL after `grace` seconds; then
        SIGKILL to what is left in its group."""
        if self.proc.stdin is not None:  # a child that waits for a line on stdin goes on, then ends
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self.proc.poll() is None:
            if self.whole_group:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
            else:
                self.proc.terminate()
            try:
                self.proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.proc.pid}) did not stop in {self.grace:.0f} s: killing it")
                self.proc.kill()
                self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # what it started in its group and left behind
        self._reader.join(5)
        self._file.close()


@contextlib.contextmanager
def child(name: str, argv: list[str], logs: Path, **kwargs) -> Iterator[Child]:
    process = Child(name, argv, logs, **kwargs)
    try:
        yield process
    finally:
        process.stop()


def child_env() -> dict[str, str]:
    """This environment, with the checkout this script imports featmap_ray from first on PYTHONPATH (the
    children run the same code) and no Ray address: each child starts a Ray of its own."""
    import featmap_ray

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    checkout = str(Path(featmap_ray.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [checkout, env.get("PYTHONPATH")]))
    return env


def featmap(*args: str) -> list[str]:
    return [sys.executable, "-m", "featmap_ray.cli", *args]


def repo_relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float, process: Child, headers: dict[str, str] | None = None) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=5, headers=headers).status_code == 200:
                return
        if process.proc.poll() is not None:
            raise RuntimeError(f"{process.name} ended (exit {process.proc.returncode}):\n{process.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 in {timeout:.0f} s:\n{process.tail()}")
        time.sleep(1)


# -- images -----------------------------------------------------------------------------------------------

def save_png(image, path: Path, max_bytes: int = MAX_BYTES) -> Path:
    """`image` (PIL) as an optimised PNG of at most `max_bytes`: full colour when it fits, else a 256-colour
    palette, else smaller by steps of 10 %."""
    from PIL import Image

    image = image.convert("RGB")
    while True:
        for candidate in (image, image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)):
            buffer = io.BytesIO()
            candidate.save(buffer, "PNG", optimize=True)
            if buffer.tell() <= max_bytes:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(buffer.getvalue())
                log(f"wrote {path} ({image.width}x{image.height}, {buffer.tell() / 1000:.0f} kB)")
                return path
        image = image.resize((int(image.width * 0.9), int(image.height * 0.9)), Image.Resampling.LANCZOS)


def screenshot(driver, path: Path) -> Path:
    from PIL import Image

    return save_png(Image.open(io.BytesIO(driver.get_screenshot_as_png())), path)


@contextlib.contextmanager
def chromium(size: tuple[int, int] = WINDOW) -> Iterator[object]:
    """Headless Chromium driven by Selenium (chromedriver, stopped by driver.quit())."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        raise RuntimeError(f"headless Chromium is missing ({', '.join(missing)}): `make browser` installs Debian's "
                           f"chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must not try to download a driver or a browser
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", f"--window-size={size[0]},{size[1]}", "--hide-scrollbars",
                "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        set_viewport(driver, *size)
        yield driver
    finally:
        driver.quit()


def set_viewport(driver, width: int, height: int) -> None:
    """The page's visible area (what a screenshot shows) `width` x `height`: the window, less what it takes."""
    driver.set_window_size(width, height)
    inner_w, inner_h = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(2 * width - inner_w, 2 * height - inner_h)


def wait_until(driver, condition: Callable[[object], object], timeout: float, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(condition)
    except TimeoutException:
        shot = ""
        if FAILED_SHOTS is not None:  # what the page showed instead, for the one who reads the error
            path = FAILED_SHOTS / f"timeout-{time.strftime('%H%M%S')}.png"
            with contextlib.suppress(Exception):
                driver.save_screenshot(str(path))
                shot = f"; the page then: {path}"
        raise RuntimeError(f"{what}: not there after {timeout:.0f} s ({driver.current_url}{shot})") from None


def visible(driver, css: str) -> list:
    from selenium.webdriver.common.by import By

    return [e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]


def no_spinner(driver) -> bool:
    """Nothing on the page that looks like a loading indicator."""
    return not driver.execute_script("""
        return [...document.querySelectorAll(`[class*="spin" i], [class*="loading" i], [role="progressbar"],
                                              .MuiCircularProgress-root, [aria-busy="true"]`)]
            .some((e) => e.offsetParent !== null && e.getBoundingClientRect().width > 0);""")


# -- the demo's outputs -----------------------------------------------------------------------------------

def load(args: argparse.Namespace):
    from featmap_ray.config import load_config

    return load_config(args.config, [f"storage={args.data}"] if args.data else [])


def missing_outputs(cfg) -> list[str]:
    """What the shots need that the demo writes and is not there."""
    from featmap_ray.io import tables, tracking
    from featmap_ray.layout import Layout

    layout, study = Layout(cfg.storage), cfg.mapping.study
    missing = []
    if layout.reports(study).current() is None:
        missing.append(f"the report ({layout.reports(study)})")
    if tables.open_table(layout.results(study, "reconstructions")) is None:
        missing.append("recon-eval's results")
    if tables.open_table(layout.images) is None:
        missing.append("the images table")
    if tracking.find_experiment_id(cfg) is None or not mapping_runs(cfg):
        missing.append("finished mapping runs in MLflow")
    return missing


def run_demo(args: argparse.Namespace, logs: Path) -> None:
    overrides = [f"storage={args.data}"] if args.data else []
    # Its stages' summary lines (and its timings at the end) shown here; the rest in its log.
    with child("demo", featmap("demo", "--config", args.config, *overrides), logs, echo=r"\[|    ") as demo:
        if demo.wait() != 0:
            raise RuntimeError(f"featmap demo failed (exit {demo.proc.returncode}):\n{demo.tail()}")


def mapping_runs(cfg) -> list:
    """The study's finished mapping runs under its fit stage run (not the sweep's trials), by run name."""
    from mlflow import MlflowClient

    from featmap_ray.io import tracking

    client = MlflowClient(tracking.tracking_uri(cfg))
    exp = tracking.find_experiment_id(cfg)
    study = cfg.mapping.study
    fit = client.search_runs([exp], filter_string=f"tags.`featmap.run` = '{study}:fit'")
    if not fit:
        return []
    runs = client.search_runs(
        [exp], max_results=1000, order_by=["attributes.run_name ASC"],
        filter_string=(f"tags.`featmap.level` = 'mapping' AND tags.`featmap.study` = '{study}' AND "
                       f"tags.`mlflow.parentRunId` = '{fit[0].info.run_id}' AND attributes.status = 'FINISHED'"))
    return runs


# -- the shots --------------------------------------------------------------------------------------------

def shot_report_figure(cfg, config: Path, out: Path, logs: Path) -> Path:
    """The report's median-cosine heat map (mapping model x manipulation): the study's headline figure."""
    from PIL import Image

    from featmap_ray.layout import Layout

    report = Layout(cfg.storage).reports(cfg.mapping.study).current()
    with report.local_copy() as local:
        figures = sorted(local.glob("heatmap_cos_median_upper_*.png")) or sorted(local.glob("heatmap_*.png"))
        if not figures:
            raise RuntimeError(f"no heat map in the report {report}")
        log(f"report figure: {report}/{figures[0].name}")
        return save_png(Image.open(figures[0]), out / "report-figure.png")


def shot_demo_result(cfg, config: Path, out: Path, logs: Path) -> Path:
    """Per source: the photograph, its manipulation, FeatInv's reconstruction of the true manipulated map and of
    the map a mapping model predicted from the original's, from recon-eval's table (the first of RESULT_PAIRS
    it holds), colour photographs first; a title and a caption drawn into the image say what it shows and
    what the models are."""
    import lance
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from featmap_ray.io import imageio, tables
    from featmap_ray.layout import Layout

    layout = Layout(cfg.storage)
    recon = lance.dataset(layout.results(cfg.mapping.study, "reconstructions")).to_table().to_pandas()
    held = set(zip(recon["variant"], recon["model"], strict=True))
    manipulation, model = next((pair for pair in RESULT_PAIRS if pair in held), min(held))
    rows = recon[(recon["variant"] == manipulation) & (recon["model"] == model)].drop_duplicates("source_id")
    keys = {(s, v) for s in rows["source_id"] for v in ("original", manipulation)}
    stored = tables.Store(cfg.storage).rows(layout.images, keys, ["image"]).to_pylist()
    images = {(r["source_id"], r["variant"]): Image.fromarray(imageio.decode_png_rgb(r["image"])) for r in stored}

    def colourfulness(source_id: str) -> float:  # mean saturation of the original
        return float(np.asarray(images[(source_id, "original")].convert("HSV"))[..., 1].mean())

    rows = rows.assign(colour=rows["source_id"].map(colourfulness)).sort_values(["colour", "source_id"],
                                                                                  ascending=[False, True])
    rows = rows.head(RESULT_SOURCES)
    columns = [("original", lambda r: images[(r["source_id"], "original")]),
               (f"manipulated\n({manipulation})", lambda r: images[(r["source_id"], manipulation)]),
               ("FeatInv of the true\nmanipulated map", lambda r: decode(r["recon_target"])),
               (f"FeatInv of the {model} model's\nprediction (from the original)",
                lambda r: decode(r["recon_mapped"]))]
    cell, pad, title_h, head_h, line_h = 200, 12, 34, 46, 18
    font = ImageFont.load_default(size=15)
    bold = ImageFont.load_default(size=17)
    small = ImageFont.load_default(size=13)
    width = pad + len(columns) * (cell + pad)
    backbone = cfg.extract.backbones[0]
    title = (f"FeatMap demo, {backbone.name} {rows.iloc[0]['layer']}: {manipulation}, {model} mapping model, "
             f"{len(rows)} test photographs")
    caption = wrap(CAPTION, small, width - 2 * pad)
    top = title_h + head_h
    height = top + len(rows) * (cell + pad) + line_h * len(caption) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill="black", font=bold)
    for j, (heading, _) in enumerate(columns):
        draw.multiline_text((pad + j * (cell + pad) + cell / 2, top - 6), heading, fill="black", font=font,
                            anchor="md", align="center")
    for i, (_, row) in enumerate(rows.iterrows()):
        for j, (_, get) in enumerate(columns):
            image = get(row).convert("RGB").resize((cell, cell), Image.Resampling.BICUBIC)
            canvas.paste(image, (pad + j * (cell + pad), top + i * (cell + pad)))
    y = top + len(rows) * (cell + pad)
    for line in caption:
        draw.text((pad, y), line, fill="#444444", font=small)
        y += line_h
    log(f"demo result: {len(rows)} sources of {manipulation}, model {model}")
    return save_png(canvas, out / "demo-result.png")


def decode(png: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(png))


def wrap(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if font.getlength(trial) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + [line]


def shot_mlflow_compare(cfg, config: Path, out: Path, logs: Path) -> Path:
    """`mlflow ui` on the demo's database, its compare-runs page for the study's mapping runs."""
    from selenium.webdriver.common.by import By

    from featmap_ray.io import tracking

    uri = tracking.tracking_uri(cfg)
    exp = tracking.find_experiment_id(cfg)
    runs = mapping_runs(cfg)
    if not runs:
        raise RuntimeError("no finished mapping run of the study in MLflow")
    port = free_port()
    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1"]
    # Without MLflow's job runner (nothing to run here); SIGTERM to the CLI, its server and workers at once.
    no_jobs = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with child("mlflow-ui", argv, logs, env=no_jobs, whole_group=True) as ui, chromium() as driver:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/health", 300, ui)
        ids = json.dumps([r.info.run_id for r in runs], separators=(",", ":"))
        driver.get(f"{base}/#/compare-runs?runs={ids}&experiments={json.dumps([exp])}")
        # The table lists each run by name; the parallel-coordinates plot is drawn by Plotly.
        names = [r.info.run_name for r in runs]
        wait_until(driver, lambda d: names[0] in d.page_source and visible(d, ".js-plotly-plot .main-svg"), 180,
                   "the compare page's plot and table")
        # The UI's model-training mode, without its assistant panel (both cosmetic: skipped when not there) ...
        for element in [*visible(driver, "[role='button']"), *visible(driver, "button[aria-label='Close']")]:
            if element.get_attribute("aria-label") == "Close" or element.text.strip() == "Model training":
                element.click()
                time.sleep(0.5)
        # ... and the plot's axes: what each run is (manipulation, model) and how well it maps (the evaluation's
        # median cosine), instead of the first parameters by name (hashes).
        driver.find_element(By.CSS_SELECTOR, "[data-testid='clear-button']").click()
        selects = visible(driver, ".du-bois-light-select-multiple")
        if len(selects) < 2:
            raise RuntimeError("the compare page's Parameters and Metrics selects are not there")
        for select, values in zip(selects, (PLOT_PARAMS, PLOT_METRICS), strict=False):
            choose(select, values)
        for title in visible(driver, "h1, h2, h3"):  # focus off the select: its outline would show
            if title.text.startswith("Comparing"):
                title.click()
        driver.execute_script("window.scrollTo(0, 0)")
        wait_until(driver, no_spinner, 60, "the compare page without spinners")
        time.sleep(2)  # Plotly's transitions
        return screenshot(driver, out / "mlflow-compare.png")


def choose(select, values: tuple[str, ...]) -> None:
    """Pick `values` in one of MLflow's multiple-choice selects: typed, then Enter; each must show as chosen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    select.click()
    field = select.find_element(By.CSS_SELECTOR, "input")
    for value in values:
        field.send_keys(value)
        time.sleep(0.5)  # the option list filters as one types
        field.send_keys(Keys.ENTER)
        time.sleep(0.5)
    field.send_keys(Keys.ESCAPE)
    chosen = [e.text for e in select.find_elements(By.CSS_SELECTOR, ".du-bois-light-select-selection-item-content")]
    if chosen != list(values):
        raise RuntimeError(f"the compare page's select shows {chosen}, not {list(values)}")


def ray_token() -> str | None:
    """The token of a local Ray with token authentication (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, else
    ~/.ray/auth_token), which the dashboard takes as a cookie."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return path.read_text().strip() if path.is_file() else None


def shot_ray_dashboard(cfg, config: Path, out: Path, logs: Path) -> Path:
    """`featmap extract` (a Ray Data job: read images -> backbone actors -> write Lance) on a copy of the demo's
    images table in a temporary storage root, in a child that starts Ray with the dashboard and holds it after
    the stage until the shot is taken; the dashboard's page of that job, with its Ray Data overview."""
    from featmap_ray.layout import Layout

    with tempfile.TemporaryDirectory(prefix="featmap-shots-") as tmp:
        storage = Path(tmp, "featmap_data")
        storage.mkdir()
        shutil.copytree(Layout(cfg.storage).images, Layout(str(storage)).images)
        # Paths relative to the repository (the child's working directory): the job's entrypoint on the page.
        argv = [sys.executable, repo_relative(Path(__file__)), CHILD_STAGE, DASHBOARD_STAGE, repo_relative(config),
                f"storage={storage}", "ray.address=null"]  # a Ray of its own, whatever the config says
        with child("ray-stage", argv, logs, stdin=True, grace=120) as stage, chromium() as driver:
            match = stage.wait_for(r"\[shots\] dashboard (\S+) job (\S+)", timeout=300)
            base, job = match.group(1), match.group(2)
            token = ray_token()
            headers = {"Authorization": f"Bearer {token}"} if token else None
            wait_for_http(f"{base}/api/version", 120, stage, headers)
            driver.get(f"{base}/favicon.ico")
            if token:
                driver.add_cookie({"name": "ray-authentication-token", "value": token, "path": "/"})
            driver.get(f"{base}/#/jobs/{job}")
            # The job's page: its Ray Data overview (a collapsed section until the dataset reports), opened with
            # the dataset's row expanded into its operators.
            wait_until(driver, ray_data_operators_shown, 300, "the job page's Ray Data operators")
            driver.execute_script("document.body.style.zoom = '0.8'")  # the job's status and all its operators
            time.sleep(2)
            finished = any("[shots] stage finished" in line for line in stage.lines)
            log(f"dashboard shot taken while the stage {'had finished (Ray held)' if finished else 'runs'}")
            path = screenshot(driver, out / "ray-dashboard.png")
            return path  # leaving the block ends the child: stdin closed, it shuts its Ray down and exits


def ray_data_operators_shown(driver) -> bool:
    """Opens the job page's Ray Data overview, then its dataset's row, one click per call; True once the
    dataset's operators are rows of the table."""
    from selenium.webdriver.common.by import By

    table = driver.find_elements(By.XPATH, "//table[.//th[contains(., 'Dataset / Operator Name')]]")
    if not table:
        heading = [e for e in driver.find_elements(By.XPATH, "//*[normalize-space(text())='Ray Data Overview']")
                   if e.is_displayed()]
        if heading:
            heading[0].click()
        return False
    expand = table[0].find_elements(By.XPATH, ".//*[local-name()='svg'][*[local-name()='title' and "
                                              "starts-with(normalize-space(.), 'Expand Dataset')]]/..")
    if expand:
        expand[0].click()
        return False
    # Operators listed, and past their start: two beyond the input have output blocks ("done / total").
    return driver.execute_script("""
        const table = arguments[0];
        const column = [...table.querySelectorAll('thead th')]
            .findIndex((th) => th.textContent.includes('Blocks Outputted'));
        const operators = [...table.querySelectorAll('tbody tr')].slice(1)  // the dataset's own row first
            .filter((tr) => !tr.textContent.trim().startsWith('Input'));
        return operators.filter((tr) => parseInt(tr.children[column]?.textContent || '0') > 0).length >= 2;""",
        table[0])


def stage_with_dashboard(argv: list[str]) -> int:
    """The child of shot_ray_dashboard: STAGE CONFIG [key=value ...] with an embedded Ray that has the
    dashboard; prints its address and the job id, runs the stage, then keeps Ray up until a line on stdin."""
    import ray

    from featmap_ray.config import load_config
    from featmap_ray.stages import base, runtime

    name, config, *overrides = argv
    cfg = load_config(config, overrides)
    stage = base.registry()[name]
    for check in stage.checks:
        check(cfg)
    runtime.init_ray(cfg, state_api=True)
    try:
        print(f"[shots] dashboard {os.environ['RAY_API_SERVER_ADDRESS']} job {ray.get_runtime_context().get_job_id()}",
              flush=True)
        result = stage.run(cfg)
        if result is not None:
            print(result, flush=True)
        print("[shots] stage finished", flush=True)
        sys.stdin.readline()
    finally:
        runtime.shutdown_ray()
    return 0


def upload_image(cfg, tmp: Path) -> Path:
    """A demo photograph (an original of the images table, UPLOAD_SOURCE when there) as a PNG file to upload."""
    import lance

    from featmap_ray.layout import Layout

    table = lance.dataset(Layout(cfg.storage).images).to_table(
        columns=["source_path", "image"], filter="variant = 'original'").to_pylist()
    chosen = next((r for r in table if UPLOAD_SOURCE in Path(r["source_path"] or "").name), table[0])
    path = tmp / (Path(chosen["source_path"] or "upload.png").stem + ".png")
    path.write_bytes(chosen["image"])
    return path


def shot_reconstruction_page(cfg, config: Path, out: Path, logs: Path) -> Path:
    """`featmap serve` on the demo's FeatInv; the page after an upload with three seeds."""
    from selenium.webdriver.common.by import By

    port = free_port()
    overrides = [f"storage={cfg.storage}", f"serve.port={port}"]
    with tempfile.TemporaryDirectory(prefix="featmap-shots-") as tmp, \
            child("serve", featmap("serve", "--config", str(config), *overrides), logs, grace=180) as serve, \
            chromium() as driver:
        upload = upload_image(cfg, Path(tmp))
        url = serve.wait_for(r"\[serve\] page: (\S+?)/?$", timeout=600).group(1)
        driver.get(url + "/")
        wait_until(driver, lambda d: d.find_element(By.ID, "run").is_enabled(), 180, "the page's model list")
        driver.find_element(By.ID, "file-input").send_keys(str(upload))
        seeds = driver.find_element(By.ID, "seeds")
        seeds.clear()
        seeds.send_keys(PAGE_SEEDS)
        driver.find_element(By.ID, "run").click()
        wait_until(driver, lambda d: d.find_element(By.ID, "results").is_displayed()
                   or d.find_element(By.ID, "error").is_displayed(), 300, "the reconstructions")
        error = driver.find_element(By.ID, "error")
        if error.is_displayed():
            raise RuntimeError(f"the page shows an error: {error.text}")
        wait_until(driver, lambda d: d.execute_script(
            "return [...document.images].every((i) => !i.src || (i.complete && i.naturalWidth > 0))"), 30,
            "the result images")
        # The form above, the results below: the window as tall as the page (the width stays), one shot.
        height = driver.execute_script("return document.documentElement.scrollHeight")
        set_viewport(driver, WINDOW[0], max(WINDOW[1], min(height, 2400)))
        time.sleep(1)
        return screenshot(driver, out / "reconstruction-page.png")


SHOT_FUNCTIONS = {"mlflow-compare": shot_mlflow_compare, "ray-dashboard": shot_ray_dashboard,
                  "reconstruction-page": shot_reconstruction_page, "report-figure": shot_report_figure,
                  "demo-result": shot_demo_result}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "docs" / "img"), help="where the PNGs go (default: docs/img)")
    parser.add_argument("--config", default=str(REPO / "conf" / "demo.yaml"),
                        help="the demo's config (default: conf/demo.yaml)")
    parser.add_argument("--data", default=None,
                        help="the demo's storage root, when not the config's (conf/demo.yaml: ./featmap_data)")
    parser.add_argument("--only", nargs="+", choices=SHOTS, default=list(SHOTS), metavar="NAME",
                        help=f"make only these: {', '.join(SHOTS)}")
    parser.add_argument("--demo", action="store_true", help="run `featmap demo` first even when its outputs exist")
    parser.add_argument("--tries", type=int, default=3,
                        help="attempts per image (default 3: on a busy machine Ray's start can time out)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_STAGE]:
        return stage_with_dashboard(argv[1:])
    args = parse_args(argv)
    # `kill` of this script (or of make) ends it through its finally blocks: every child stopped by its id.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Paths given are relative to where the command runs; the config's relative storage root to the repository.
    args.config, args.out = str(Path(args.config).resolve()), str(Path(args.out).resolve())
    if args.data is not None and "://" not in args.data:
        args.data = str(Path(args.data).resolve())
    os.chdir(REPO)  # the config's relative storage root is the repository's
    started = time.monotonic()
    cfg = load(args)
    logs = Path(cfg.storage, "logs", time.strftime("screenshots-%Y%m%d-%H%M%S"))
    logs.mkdir(parents=True, exist_ok=True)
    global FAILED_SHOTS
    FAILED_SHOTS = logs
    missing = missing_outputs(cfg)
    if missing or args.demo:
        log(f"running the demo first ({'; '.join(missing) + ' missing' if missing else '--demo'})")
        run_demo(args, logs)
        if missing := missing_outputs(cfg):
            raise RuntimeError(f"after featmap demo, still missing: {'; '.join(missing)}")
    out = Path(args.out)
    failed = []
    for name in args.only:
        start = time.monotonic()
        for attempt in range(1, args.tries + 1):
            try:
                SHOT_FUNCTIONS[name](cfg, Path(args.config), out, logs)
                break
            except Exception as e:  # noqa: BLE001 -- the other shots are still taken; the exit status says one failed
                log(f"{name}: attempt {attempt} of {args.tries} failed: {type(e).__name__}: {e}")
                if attempt < args.tries:
                    time.sleep(RETRY_PAUSE_S)
        else:
            failed.append(name)
        log(f"{name}: {time.monotonic() - start:.0f} s")
    log(f"done in {time.monotonic() - started:.0f} s; logs in {logs}"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
