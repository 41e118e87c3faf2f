# Two commands: `make demo` (set up, then run the pipeline on the embedded default) and
# `make test` (set up, then run the test suite). Setup creates .venv when missing.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup demo test benchmark clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	# torch/torchvision first, pinned as a pair: PyPI torchvision fails next to other torch builds.
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	.venv/bin/featmap pipeline --config conf/demo.yaml
	.venv/bin/featmap study --config conf/demo.yaml

test: setup
	$(PY) -m pytest -q

benchmark: setup
	$(PY) benchmarks/extract_throughput.py
	$(PY) benchmarks/mapping_throughput.py
	$(PY) benchmarks/featinv_sampling.py

clean:
	rm -rf featmap_data .pytest_cache
