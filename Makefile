# The two front-door commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CIFAR-10 image-folder tree; the demo calibrates on it when present (see README).
DATA_TGZ ?= ../shared/data/cifar10-jpeg.tar.gz
DATA_DIR ?= data/cifar10

.PHONY: demo test data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

data: $(DATA_DIR)/train
$(DATA_DIR)/train:
	@test -f $(DATA_TGZ) || { echo "no dataset at $(DATA_TGZ); the demo falls back to synthetic calibration"; exit 0; }
	mkdir -p $(DATA_DIR) && tar -xzf $(DATA_TGZ) -C $(DATA_DIR)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

clean:
	rm -rf $(VENV) build
