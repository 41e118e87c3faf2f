# Two commands: `make demo` (set up, then run the pipeline on the embedded default) and
# `make test` (set up, then run the test suite). Setup creates .venv when missing.
PY := .venv/bin/python
STAMP := .venv/.installed
# moto's S3 server for the loopback cluster test (tests/test_cluster_loopback.py), in a venv of its own:
# moto[server] pulls graphql-core 3.3, which conflicts with MLflow's graphene pin.
MOTO_VERSION := 5.2.5
MOTO_STAMP := .tools/moto/.installed-$(MOTO_VERSION)

.PHONY: setup demo test benchmark clean

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

setup: $(STAMP) $(MOTO_STAMP)

demo: setup
	.venv/bin/featmap pipeline --config conf/demo.yaml
	.venv/bin/featmap study --config conf/demo.yaml

test: setup
	$(PY) -m pytest -q

benchmark: setup
	$(PY) benchmarks/extract_throughput.py
	$(PY) benchmarks/mapping_throughput.py
	$(PY) benchmarks/featinv_sampling.py
	$(PY) benchmarks/capacity.py

clean:
	rm -rf featmap_data .pytest_cache
