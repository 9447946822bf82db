# `make run` and `make test` each set up .venv from nothing (Debian packages included), then run.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED := False
export PYTHONPATH := $(CURDIR)

.PHONY: setup run test lint screenshots clean

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

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
