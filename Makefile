# Two entry points (see README): `make demo` runs the embedded default, `make test` the tests.
# Both build .venv from this repository's own files first; nothing needs installing by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch wheels this project is tested with; pinning them here keeps pip from
# resolving to a newer multi-GB CUDA build.
TORCH  := torch==2.14.1 torchvision==0.29.1
EMOJI_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf

.PHONY: setup fonts demo test lint matrix-data matrix
setup: $(BIN)/.installed fonts

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH) -e ".[dev,sam,ray]"
	touch $@

# The zoo's scenes are rendered from Debian's colour emoji font.
fonts:
	@test -f $(EMOJI_FONT) || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq fonts-noto-color-emoji; }

# The detection matrix's photo scenes use Debian's photo cut-outs (~160 MB): the benchmark and
# the suite's weak-ResNet matrix models need them.
STAMPS := /usr/share/tuxpaint/stamps
matrix-data:
	@test -d $(STAMPS) || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq tuxpaint-stamps-default; }

matrix: setup matrix-data
	$(BIN)/python -m benchmarks.matrix --split $(or $(SPLIT),tuning)

demo: setup
	$(BIN)/clip-audit demo

test: setup matrix-data
	$(BIN)/ruff check auditor engines tests benchmarks
	$(BIN)/mypy auditor engines
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check auditor engines tests benchmarks
	$(BIN)/mypy auditor engines
