# Two commands on a fresh machine: `make serve` (server + demo model, no torch) and `make test` (everything).
# Both use .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# What `make serve` needs: the server and the torch-free demo builder (a full install includes it).
SERVE_INSTALLED := $(VENV)/.installed-serve
MODEL_DIR ?= models/tiny
PORT ?= 50051
# onnxruntime-gpu cannot share a virtualenv with onnxruntime: the GPU wheel gets its own, with the
# server's runtime dependencies only (the code comes from PYTHONPATH). Without a GPU it runs on its
# CPU provider, which still catches graphs it cannot load (IR version, opset, op versions).
GPU_VENV := .venv-ort-gpu
GPU_PY := $(GPU_VENV)/bin/python
GPU_INSTALLED := $(GPU_VENV)/.installed
# The CUDA checks run on these: the demo model in fp32 and the same weights exported in fp16, and
# exported with LoRA adapter slots.
GPU_MODEL_DIRS := models/tiny models/tiny-fp16
GPU_LORA_DIR := models/tiny-lora

.PHONY: install gpu-venv serve test test-gpu stress proto lint typecheck bench demo clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server,demo,export,dev]'
	touch $@ $(SERVE_INSTALLED)

# --no-compile: Python compiles the modules it imports on first use; precompiling every installed
# file took about a quarter of pip's CPU time here.
$(SERVE_INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile -e '.[server,demo]'
	touch $@

gpu-venv: $(GPU_INSTALLED)

# Not removed first: pip only changes what pyproject.toml changed, so a rebuild takes seconds.
$(GPU_INSTALLED): pyproject.toml scripts/requirements.py
	test -x $(GPU_PY) || $(PYTHON) -m venv $(GPU_VENV)
	$(PYTHON) scripts/requirements.py gpu 'pytest>=8' > $(GPU_VENV)/requirements.txt
	$(GPU_PY) -m pip install --quiet -r $(GPU_VENV)/requirements.txt
	touch $@

# The demo model: random weights from numpy, the real Mistral tokenizer; built once.
$(MODEL_DIR)/textgen.json: | $(SERVE_INSTALLED)
	$(VENV)/bin/textgen-export demo --out $(MODEL_DIR) --size $(if $(findstring bench,$(MODEL_DIR)),bench,tiny) --overwrite

demo: $(MODEL_DIR)/textgen.json

# glibc's malloc maps the weights in 2 MiB pages as they load (server/textgen_server/huge_pages.py).
serve: $(SERVE_INSTALLED) $(MODEL_DIR)/textgen.json
	GLIBC_TUNABLES=$${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1} \
		$(VENV)/bin/textgen-server --model-dir $(MODEL_DIR) --port $(PORT)

test: $(INSTALLED) $(GPU_INSTALLED)
	$(PY) -m pytest -q

# Exported again when the exporter or the format it writes (model_config.py) changes: the GPU
# checks must run what it writes now.
EXPORTER_SOURCES := $(wildcard export/textgen_export/*.py) server/textgen_server/model_config.py

models/tiny-fp16/textgen.json: models/tiny/textgen.json $(EXPORTER_SOURCES) | $(INSTALLED)
	$(VENV)/bin/textgen-export model models/tiny/checkpoint --out models/tiny-fp16 --dtype fp16 --overwrite

$(GPU_LORA_DIR)/textgen.json: models/tiny/textgen.json $(EXPORTER_SOURCES) | $(INSTALLED)
	$(VENV)/bin/textgen-export model models/tiny/checkpoint --out $(GPU_LORA_DIR) --lora-slots 3 --lora-rank 16 --overwrite

# The CUDA checks under onnxruntime-gpu: tests marked gpu are skipped, with the reason, without CUDA;
# the --provider cuda refusal runs everywhere. conftest.py is the main venv's (it builds models with
# the exporter); pytest-asyncio's options in pyproject.toml mean nothing here.
test-gpu: $(GPU_INSTALLED) $(addsuffix /textgen.json,$(GPU_MODEL_DIRS) $(GPU_LORA_DIR))
	TEXTGEN_GPU_MODEL_DIRS="$(GPU_MODEL_DIRS)" TEXTGEN_GPU_LORA_DIR="$(GPU_LORA_DIR)" PYTHONPATH=server:sdk \
		$(GPU_PY) -m pytest --noconftest -p no:cacheprovider -W ignore::pytest.PytestConfigWarning -rs -q \
		tests/test_gpu.py

# Long runs: the fuzz suite with 12,000 requests, then the soak (SOAK_MINUTES of 32 streams against a
# textgen-server process). Figures, memory curve and server log go to docs/reliability/.
SOAK_MINUTES ?= 30
FUZZ_EXAMPLES ?= 12000
stress: $(INSTALLED) $(MODEL_DIR)/textgen.json
	TEXTGEN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) TEXTGEN_FUZZ_REPORT=docs/reliability/fuzz.json \
		$(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py
	$(PY) tests/stress/soak.py --model-dir $(MODEL_DIR) --minutes $(SOAK_MINUTES) --out docs/reliability

proto: $(INSTALLED)
	PATH=$(VENV)/bin:$$PATH bash scripts/gen_proto.sh

lint: $(INSTALLED)
	$(VENV)/bin/ruff check sdk server export tests bench
	$(VENV)/bin/ruff format --check sdk server export tests bench

typecheck: $(INSTALLED)
	$(PY) -m mypy --strict sdk/textgen server/textgen_server export/textgen_export

bench: $(INSTALLED)
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(GPU_VENV) models build *.egg-info
