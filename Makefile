# Two commands: `make demo` (set up, then run the pipeline on the embedded default) and
# `make test` (set up, build the documentation site, then run the test suite); `make test-fast` the library
# tests alone; `make benchmark` and `make gpu-check` (on a GPU) measure; `make docs` builds the site alone and
# `make docs-screenshots` remakes the docs' images from the demo. Setup creates .venv when missing.
PY := .venv/bin/python
STAMP := .venv/.installed
# moto's S3 server for the loopback cluster test (tests/test_cluster_loopback.py), in a venv of its own:
# moto[server] pulls graphql-core 3.3, which conflicts with MLflow's graphene pin.
MOTO_VERSION := 5.2.5
MOTO_STAMP := .tools/moto/.installed-$(MOTO_VERSION)

.PHONY: setup browser demo docs docs-screenshots test test-fast benchmark gpu-check clean

# uv installs (pinned below) in parallel: the whole setup takes ~1 min instead of pip's ~6.
UV_VERSION := 0.13.10
UV := .venv/bin/uv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	test -x $(UV) || $(PY) -m pip install -q "uv==$(UV_VERSION)"
	# torch/torchvision first, pinned as a pair: PyPI torchvision fails next to other torch builds.
	$(UV) pip install -q --python $(PY) "torch==2.14.1" "torchvision==0.29.1"
	$(UV) pip install -q --python $(PY) -e ".[dev]"
	touch $(STAMP)

$(MOTO_STAMP): $(STAMP)
	test -x .tools/moto/bin/python || python3 -m venv .tools/moto
	$(UV) pip install -q --python .tools/moto/bin/python "moto[server]==$(MOTO_VERSION)"
	touch $(MOTO_STAMP)

# Headless Chromium for the web page's browser test (tests/serve_page.py, run by tests/test_serve.py): Debian's chromium and
# chromium-driver, installed when missing and apt-get can run (as root, as in CI). Anywhere else setup goes
# on and the browser tests fail, naming what to install.
browser:
	@if [ -x /usr/lib/chromium/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -q --no-install-recommends -y \
			chromium chromium-driver) || echo "make: could not install chromium chromium-driver; the browser tests will fail"; \
	else echo "make: chromium/chromium-driver missing and apt-get needs root; the browser tests will fail"; fi

setup: $(STAMP) $(MOTO_STAMP)

# The whole study on the embedded default, in one process (one Ray), with each stage's wall time at the end.
demo: setup
	.venv/bin/featmap demo --config conf/demo.yaml

# The documentation site (mkdocs.yml, docs/): --strict fails on a broken link, a missing page or anchor, or a
# reference generator that breaks (docs/hooks.py builds the CLI, config and table reference from the code).
# Written to site/ (ignored by git).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# The library tests on two pytest-xdist workers, then the tests that start Ray, servers or processes (marked
# `slow`, tests/conftest.py) in one process sharing one Ray: two Ray instances on two cores slow each other down
# more than they gain.
test: setup browser docs
	.venv/bin/lint-imports
	$(PY) -m pytest -q -n 2 -m "not slow"
	$(PY) -m pytest -q -m slow

# The inner loop: the library tests, without Ray, the S3 server or the CLI (tests marked `slow`), in < 3 min.
test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow"

benchmark: setup
	$(PY) benchmarks/extract_throughput.py
	$(PY) benchmarks/mapping_throughput.py
	$(PY) benchmarks/featinv_sampling.py
	$(PY) benchmarks/serve_throughput.py
	$(PY) benchmarks/capacity.py

# The GPU run-book (docs/benchmarks/gpu-run-book.md): on one CUDA GPU, random weights, nothing downloaded, under 8 minutes.
# Its CPU dry run (--dry-run, tiny models) is tests/test_gpu_check.py, inside `make test`.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

# The docs' images (docs/img/*.png) from the demo's real outputs, taken in headless Chromium (docs/screenshots.py):
# runs the demo first when its outputs are missing.
docs-screenshots: setup browser
	$(PY) docs/screenshots.py

clean:
	rm -rf featmap_data .pytest_cache site
