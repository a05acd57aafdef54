# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
# torch goes in first and pinned: a bare `torch` pulls a multi-GB CUDA build from PyPI.
# On a CUDA machine: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: demo test install install-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH)
	touch $@

# with face identity (the demo shows its scores; `pip install -e .` alone works without it)
$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e '.[identity]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e '.[dev]'
	# the reference decoder our watermark must stay readable by; --no-deps because it would pull
	# opencv-python 5, which replaces opencv-python-headless 4 (and its face cascades)
	$(BIN)/python -m pip install -q --no-deps invisible-watermark==0.2.0
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/finetune demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/sample.py

clean:
	rm -rf $(VENV) build *.egg-info
