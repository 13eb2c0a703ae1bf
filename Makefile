# diffusion-gym: `make demo` and `make test` create .venv and install the project on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint install embedded clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/diffusion-gym sample --n 100 --out runs/demo/samples.png

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Re-train the shipped embedded models (about 10 minutes on 2 CPU cores) and re-measure them.
embedded: $(STAMP)
	$(BIN)/python scripts/train_digits_classifier.py
	$(BIN)/python scripts/train_digits_ddpm.py
	$(BIN)/python scripts/evaluate_embedded.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
