# Two commands for a fresh machine: `make setup` then `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test lint bench docs

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	# dev includes the trackers the tests read back (wandb, mlflow-skinny: ~20 s each to install measured
	# from the wheel cache), build (the wheel) and the HF/timm references
	$(BIN)/pip install --quiet -e '.[dev]'
	# dall-e is the reference for the tokenizer test; its own requirements pull
	# unneeded heavy extras, so it is installed without them.
	$(BIN)/pip install --quiet --no-deps dall-e==0.1

test:
	$(BIN)/ruff check beit tests bench
	$(BIN)/python -m pytest -n 2 -q tests

bench:
	$(BIN)/python bench/pretrain_step.py

# API reference from the docstrings (pdoc, in the dev and docs extras); tests/core/test_python_api.py builds it too
docs:
	$(BIN)/python -m pdoc beit beit.workflows beit.loading beit.preprocess beit.exporting beit.tasks.embed beit.config beit.models.vit -o docs/api
