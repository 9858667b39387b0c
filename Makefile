# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv if missing and install the project through constraints.txt:
# an unpinned torch would pull several GB of CUDA packages on a CPU machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo_out

.PHONY: install browser test demo bench clean

install: $(STAMP)

# The report test renders report.html in headless Chromium (tests/test_report.py). Installed from Debian where
# this runs as root with apt-get; elsewhere that one test skips and says why.
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium (Debian) for the report rendering test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        chromium >/dev/null) || echo "make: could not install chromium: the report rendering test will skip" >&2; \
	else echo "make: no chromium and no root apt-get: the report rendering test will skip" >&2; fi

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,decord,ray]'
	touch $(STAMP)

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: $(STAMP) browser
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The main job on the embedded default (the toy world), as the commands a user would type:
# a base image VLM, its two-stage adaptation to video, then `engine caption` over the unlabeled pool;
# then two dual encoders, on the pseudo-captions and on the alt-text, evaluated on the test split's gt.txt.
# Re-running reuses finished steps (committed shards and finished checkpoints are kept).
TOY := $(DEMO)/toy
# The two dual encoders of the demo train alike, only the text differs (pseudo-captions vs alt-text).
DE_TRAIN ?= --model toy-vit --temporal mean --frames 4 --batch-size 32 --steps 300 --lr 1e-3 --warmup 30 \
            --workers 1 --save-every 100
demo: $(STAMP)
	$(BIN)/engine synth --out $(TOY) --split pretrain --n 2000 --seed 0
	$(BIN)/engine synth --out $(TOY) --split adapt --n 1000 --seed 0
	$(BIN)/engine synth --out $(TOY) --split pool --n 1000 --seed 0
	$(BIN)/captioner pretrain-toy --shards '$(TOY)/pretrain-*.tar' --out $(DEMO)/base --threads 1
	$(BIN)/captioner adapt --stage visual --model $(DEMO)/base --shards '$(TOY)/adapt-*.tar' --out $(DEMO)/stage1 --threads 1
	$(BIN)/captioner adapt --stage language --model $(DEMO)/stage1 --shards '$(TOY)/adapt-*.tar' --out $(DEMO)/stage2 --threads 1
	$(BIN)/engine caption --shards '$(TOY)/pool-*.tar' --out $(DEMO)/captioned --model $(DEMO)/stage2 \
	    --frames 4 --batch-size 32 --max-new-tokens 24
	$(BIN)/engine verify --inputs '$(TOY)/pool-*.tar' --out $(DEMO)/captioned
	$(BIN)/captioner score-toy --shards '$(DEMO)/captioned/pool-*.tar' --n 6
	$(BIN)/engine synth --out $(TOY) --split test --n 200 --seed 0
	$(BIN)/dualenc train --shards '$(DEMO)/captioned/pool-*.tar' --text-key txt --out $(DEMO)/dualenc/pseudo $(DE_TRAIN)
	$(BIN)/dualenc train --shards '$(DEMO)/captioned/pool-*.tar' --text-key alt.txt --out $(DEMO)/dualenc/alt $(DE_TRAIN)
	$(BIN)/dualenc eval --checkpoint $(DEMO)/dualenc/alt --shards '$(TOY)/test-*.tar' --text-key gt.txt \
	    --out $(DEMO)/eval/alt-text
	$(BIN)/dualenc eval --checkpoint $(DEMO)/dualenc/pseudo --shards '$(TOY)/test-*.tar' --text-key gt.txt \
	    --out $(DEMO)/eval/pseudo-captions
	$(BIN)/dualenc report --runs $(DEMO)/eval/alt-text $(DEMO)/eval/pseudo-captions --out $(DEMO)/report
	@echo "toy shards: $(TOY)/  captioner checkpoints: $(DEMO)/base, $(DEMO)/stage1, $(DEMO)/stage2"
	@echo "pseudo-captioned pool shards: $(DEMO)/captioned/  (summary: $(BIN)/engine stats $(DEMO)/captioned)"
	@echo "dual encoders trained on pseudo-captions and on alt-text: $(DEMO)/dualenc/; side-by-side report: $(DEMO)/report/report.html"

bench: $(STAMP)
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/vision_step.py
	$(BIN)/python bench/pixel_step.py
	$(BIN)/python bench/captioner_toy.py
	$(BIN)/python bench/captioner_draws.py
	$(BIN)/python bench/temporal_toy.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/engine.py --n 1024 --layouts dedicated --out bench/results/engine_n1024.json
	nice -n 10 $(BIN)/python bench/eval.py

clean:
	rm -rf $(DEMO) .pytest_cache
