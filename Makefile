# mllmcl — one command to set up and run the demo, one to set up and run the tests.
#   make demo    # venv + install + synthetic DCL stream + tiny VLM + the main job
#   make test    # venv + install + the test suite (starts its own S3 server on loopback)

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test test-fast calibrate clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the pinned CPU wheel first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev]'
	# DeepSpeed's CPU comm op, compiled once into torch's extension cache (else on first use, ~50 s)
	$(PY) -c "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder as B; B().load(verbose=False)" \
	  || echo "warning: DeepSpeed's CPU comm op did not build (a C++ compiler is needed for scaling.strategy=deepspeed on CPU)"
	touch $@

demo: install
	scripts/loopback.sh $(PY) jobs/domain_stream.py

test: install
	scripts/loopback.sh $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	scripts/loopback.sh $(PY) -m pytest -q -m "not slow and not s3" $(PYTEST_ARGS)

calibrate: install
	scripts/loopback.sh $(PY) jobs/calibrate_synthetic.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache
