# One command each: `make demo` sets up and runs the main demo, `make test` sets up and runs the tests.
# Both create/refresh the virtual environment at .venv/ first (fast when it is up to date).
PY := .venv/bin/python

.PHONY: install demo test lint

install:
	bash scripts/install.sh

demo: install
	$(PY) examples/offline_inference/basic_generate.py
	$(PY) examples/offline_inference/omni_text_to_image.py
	$(PY) examples/online_serving/omni_serve_demo.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Line coverage of vllm_omni (every process the tests start, see [tool.coverage] in pyproject.toml) is
# printed after the tests, then the 25 slowest tests (the suite should stay under ~30 min). pytest exits 5
# when it collects no test: report it instead of failing.
test: lint
	$(PY) -m pytest --cov --cov-report=term --durations=25; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc
