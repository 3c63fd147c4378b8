# Two commands on a fresh machine: `make serve` and `make test`. Everything runs in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
MODEL_DIR ?= models/tiny
PORT ?= 50051

.PHONY: install serve test proto lint typecheck bench demo clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server,export,dev]'
	touch $@

# The demo model: random weights, the real Mistral tokenizer; built once.
$(MODEL_DIR)/textgen.json: | $(INSTALLED)
	$(VENV)/bin/textgen-export demo --out $(MODEL_DIR) --size $(if $(findstring bench,$(MODEL_DIR)),bench,tiny) --overwrite

demo: $(MODEL_DIR)/textgen.json

serve: $(INSTALLED) $(MODEL_DIR)/textgen.json
	$(VENV)/bin/textgen-server --model-dir $(MODEL_DIR) --port $(PORT)

test: $(INSTALLED)
	$(PY) -m pytest -q

proto: $(INSTALLED)
	PATH=$(VENV)/bin:$$PATH bash scripts/gen_proto.sh

lint: $(INSTALLED)
	$(VENV)/bin/ruff check sdk server export tests bench

typecheck: $(INSTALLED)
	$(PY) -m mypy --strict sdk/textgen server/textgen_server export/textgen_export

bench: $(INSTALLED)
	$(PY) -m bench

clean:
	rm -rf $(VENV) models build *.egg-info
