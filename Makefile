# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv if missing and install the project through constraints.txt:
# an unpinned torch would pull several GB of CUDA packages on a CPU machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo_out

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,decord]'
	touch $(STAMP)

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The main job on the embedded default (the toy world), as the commands a user would type.
demo: $(STAMP)
	$(BIN)/engine synth --out $(DEMO)/toy --split test --n 64 --seed 0
	$(BIN)/engine decode --shards '$(DEMO)/toy/test-*.tar' --frames 8 --limit 8
	@echo "toy-world shards are in $(DEMO)/toy/ (mp4 + json scene graph + txt alt-text + gt.txt + qa.json)"

bench: $(STAMP)
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(DEMO) .pytest_cache
