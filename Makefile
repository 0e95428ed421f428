# Two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparsifx-installed

.PHONY: demo demo-integrations test test-slow lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py
	@echo "--- optional part: fine-tuning a sparsified model under transformers' Trainer and Lightning"
	$(MAKE) --no-print-directory demo-integrations

# fine-tune under transformers' Trainer and Lightning (their packages come with the test extra)
demo-integrations: $(STAMP)
	$(PY) examples/finetune_hf_trainer.py --steps 20
	$(PY) examples/finetune_lightning.py --steps 30

test: $(STAMP)
	$(PY) -m pytest -q

# ruff: lint and formatting (configured in pyproject.toml); `make format` rewrites files
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --select I --fix .
	$(VENV)/bin/ruff format .

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info out
