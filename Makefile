# `make run` and `make test` each set up .venv from nothing (Debian packages included), then run.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED := False
export PYTHONPATH := $(CURDIR)

.PHONY: setup run test lint screenshots mini clean

$(STAMP): requirements.txt requirements-nodeps.txt scripts/setup.sh
	./scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) scripts/run.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

# Refresh docs/screenshots/ (the README's pictures) from the browser tests that take them, on Eureka-mini.
screenshots: $(STAMP)
	UPDATE_SCREENSHOTS=1 EUREKA_BROWSER_MODEL=mini $(PY) -m pytest -m screenshot tests/test_app_browser.py \
		tests/test_review_browser.py

# Eureka-mini's bundled recipe (assets/eureka-mini/README.md): data, training, export to $(MINI_EXPORT); 59 min from
# nothing on a 2-core CPU. Run again, it keeps the data and resumes training where it stopped; delete $(MINI_DATA) and
# $(MINI_OUT) to start over.
MINI_DATA ?= runs/synth8k
MINI_OUT ?= runs/mini
MINI_EXPORT ?= runs/mini-export
MINI_RECIPE := --pretrain-steps 400 --align-steps 600 --batch-size 16 --trait-weight 0.5 --loss-average example \
	--asr-weight 2 --encoder-layers 2 --encoder-lr-scale 0.1 --records-per-clip 2 --length-buckets 16 --ctc-sounds 1 \
	--encoder-bf16 1 --encoder-until-step 2000 --frozen-records-per-clip 1 --grad-clip group --sft-steps 6700 \
	--sft-decay-steps 4500 --qa-balance 1.0 --qa-balance-from-step 4700 --sft-lr 1e-3
mini: $(STAMP)
	@started=$$(date +%s); \
	{ test -f $(MINI_DATA)/records_test.jsonl || \
	  $(PY) -m model.data --out $(MINI_DATA) --train 8000 --val 100 --test 100 --records --questions 3; } && \
	$(PY) -m model.train --data $(MINI_DATA) --out $(MINI_OUT) $(MINI_RECIPE) --export $(MINI_EXPORT) && \
	echo "Eureka-mini: $$(( $$(date +%s) - started )) s in all; evaluate it with" \
	     "$(PY) -m model.evaluate --model $(MINI_EXPORT) --data $(MINI_DATA) --split test --no-baseline"

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
