# diffusion-gym: `make demo` and `make test` create .venv and install the project on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint install embedded embedded-t2i paper paper-beyond paper-conventions paper-t2i digits-defaults clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# A short HRF-D fine-tuning run of the embedded digits model, then the base model and the run scored on the
# same 500 noises: reward, class agreement and Inception Score before -> after (about 5 minutes on 2 CPU cores).
DEMO_CONFIG ?= envs_configs/digits_hrf-d_jpeg_compressibility_demo.yaml
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/diffusion-gym train --config $(DEMO_CONFIG) --run-dir runs/demo
	$(BIN)/diffusion-gym evaluate base=embedded:digits fine-tuned=runs/demo --n 500 --reward jpeg_compressibility --out runs/demo/eval

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

# The embedded text-to-image flow model (diffusion_gym/assets/digits-t2i/, about 9 minutes on 2 CPU cores)
# and its prompt-following numbers (docs/results/embedded_t2i.json).
embedded-t2i: $(STAMP)
	$(BIN)/python scripts/train_digits_t2i.py
	$(BIN)/python scripts/evaluate_digits_t2i.py

# The paper's experiment on the embedded model: DDPO, HRF, HRF under its authors' conventions and HRF-D x 2 rewards
# x 5 seeds, each evaluated along training (fronts), final evaluation, report (docs/results/paper_digits/).
# Target <= 90 minutes on 2 CPU cores; finished runs are skipped on re-runs.
paper: $(STAMP)
	DIFFUSION_GYM_MAKE_PAPER=1 $(BIN)/diffusion-gym paper --config envs_configs/paper_digits.yaml

# The window ablation (HRF early / later presets), VARD and DRIFT on the same budget and evaluation, next to the
# committed rows of `make paper`, and DDPO again for DRIFT's fronts (docs/results/paper_digits_beyond/): 5 methods x
# 2 rewards x 5 seeds + the VARD beta sweep (4 runs); finished runs are skipped.
paper-beyond: $(STAMP)
	DIFFUSION_GYM_MAKE_PAPER=paper-beyond $(BIN)/diffusion-gym paper --config envs_configs/paper_digits_beyond.yaml

# The HRF authors' conventions one group at a time on the project's HRF (model references, one step per batch, their
# advantages and loss, half-open clusters), compressibility x 3 seeds, fronts against HRF
# (docs/results/paper_digits_conventions/); 15 runs, about 20 minutes.
paper-conventions: $(STAMP)
	DIFFUSION_GYM_MAKE_PAPER=paper-conventions $(BIN)/diffusion-gym paper --config envs_configs/paper_digits_conventions.yaml

# Every digits training config at its shipped defaults on a tuning seed: reward gain, IS and class agreement kept
# (docs/results/digits_defaults/); 16 runs, about 35 minutes.
digits-defaults: $(STAMP)
	DIFFUSION_GYM_MAKE_PAPER=digits-defaults $(BIN)/diffusion-gym paper --config envs_configs/paper_digits_defaults.yaml

# The prompt-following benchmark on the embedded text-to-image model: GRPO with full-SDE, Flow-GRPO-Fast and
# MixGRPO windows, HRF, HRF-D, DRIFT and VARD x 3 seeds, equal episodes (docs/results/paper_t2i/).
# About 35 minutes on 2 CPU cores; finished runs are skipped on re-runs.
paper-t2i: $(STAMP)
	DIFFUSION_GYM_MAKE_PAPER=paper-t2i $(BIN)/diffusion-gym paper --config envs_configs/paper_t2i.yaml

clean:
	rm -rf runs .pytest_cache .ruff_cache
