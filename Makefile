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
	$(PY) -m pip install -q --no-compile torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-compile -e '.[dev]'
	# byte-compiled once, on every core (pip compiles file by file on one: 116 s of a 234-s install on
	# 2 cores, against 72 s here); the platform's own sources too (an editable install is not compiled,
	# and where PYTHONDONTWRITEBYTECODE is set every process would compile them again). One torch file
	# is Python 3.12 syntax (skipped, as pip skips it)
	$(PY) -m compileall -qq -j 0 -x 'torch/testing/_internal/py312_intrinsics\.py$$' $(VENV)/lib platform
	# DeepSpeed's CPU comm op, compiled once into the venv (else on first use, ~50 s); the platform and
	# the tests find it there (TORCH_EXTENSIONS_DIR). DeepSpeed's import reaches MLflow, whose telemetry
	# would write ~/.config/mlflow/telemetry.json: off for the install
	MLFLOW_DISABLE_TELEMETRY=true TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions \
	  $(PY) -c "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder as B; B().load(verbose=False)" \
	  || echo "warning: DeepSpeed's CPU comm op did not build (a C++ compiler is needed for scaling.strategy=deepspeed on CPU)"
	touch $@

# The paper's point in ~4.5 minutes on 2 cores (tiny-base build included): MR-LoRA beside sequential
# LoRA-FT over the whole synthetic DCL stream, at a small budget (400 train samples per task,
# 6 epochs), in this process (scaling.backend=local: the same runner, methods and training loop
# without Ray, whose start-up per fit would double the time here). The README lists these lines
# and its test tier runs them; the full-budget commands on Ray Train are in the README.
DEMO := scaling.backend=local data.limit=400 train.epochs=6

demo: install
	$(PY) jobs/domain_stream.py run.id=demo-mr_lora $(DEMO) method.router_epochs=12 method.router_lr=4e-3
	$(PY) jobs/domain_stream.py run.id=demo-lora_ft $(DEMO) method.name=lora_ft
	$(PY) jobs/compare.py artifacts/runs/demo-mr_lora artifacts/runs/demo-lora_ft

test: install
	scripts/loopback.sh $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	scripts/loopback.sh $(PY) -m pytest -q -m "not slow and not s3" $(PYTEST_ARGS)

calibrate: install
	scripts/loopback.sh $(PY) jobs/calibrate_synthetic.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache
