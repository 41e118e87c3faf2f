# Two commands: `make demo` (set up, then run the pipeline on the embedded default) and
# `make test` (set up, then run the test suite); `make benchmark` and `make gpu-check` (on a GPU)
# measure; `make docs-screenshots` remakes the docs' images from the demo. Setup creates .venv when missing.
PY := .venv/bin/python
STAMP := .venv/.installed
# moto's S3 server for the loopback cluster test (tests/test_cluster_loopback.py), in a venv of its own:
# moto[server] pulls graphql-core 3.3, which conflicts with MLflow's graphene pin.
MOTO_VERSION := 5.2.5
MOTO_STAMP := .tools/moto/.installed-$(MOTO_VERSION)

.PHONY: setup browser demo test benchmark gpu-check docs-screenshots clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	# torch/torchvision first, pinned as a pair: PyPI torchvision fails next to other torch builds.
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

$(MOTO_STAMP):
	test -x .tools/moto/bin/python || python3 -m venv .tools/moto
	.tools/moto/bin/pip install -q "moto[server]==$(MOTO_VERSION)"
	touch $(MOTO_STAMP)

# Headless Chromium for the web page's browser test (tests/serve_page.py, run by tests/test_serve.py): Debian's chromium and
# chromium-driver, installed when missing and apt-get can run (as root, as in CI). Anywhere else setup goes
# on and that test skips, naming what to install.
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

test: setup browser
	.venv/bin/lint-imports
	$(PY) -m pytest -q

benchmark: setup
	$(PY) benchmarks/extract_throughput.py
	$(PY) benchmarks/mapping_throughput.py
	$(PY) benchmarks/featinv_sampling.py
	$(PY) benchmarks/serve_throughput.py
	$(PY) benchmarks/capacity.py

# The GPU run-book (README: Benchmarks): on one CUDA GPU, random weights, nothing downloaded, under 8 minutes.
# Its CPU dry run (--dry-run, tiny models) is tests/test_gpu_check.py, inside `make test`.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

# The docs' images (docs/img/*.png) from the demo's real outputs, taken in headless Chromium (docs/screenshots.py):
# runs the demo first when its outputs are missing.
docs-screenshots: setup browser
	$(PY) docs/screenshots.py

clean:
	rm -rf featmap_data .pytest_cache
