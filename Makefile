# The two commands of the README, and a few helpers.
#   make run    set up .venv and start Shoal on http://127.0.0.1:7860
#   make test   set up .venv with test tools and run the whole test suite
PY := .venv/bin/python
ARGS ?=

.PHONY: run test setup setup-dev lint bench clean

run: setup
	$(PY) app.py $(ARGS)

test: setup-dev
	$(PY) -m pytest $(ARGS)

setup:
	bash scripts/setup.sh

setup-dev:
	bash scripts/setup.sh --dev

lint: setup-dev
	$(PY) -m ruff check .

bench: setup-dev
	$(PY) bench/throughput.py --quick

clean:
	rm -rf .venv data .cache test-artifacts
