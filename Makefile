# One command each: `make demo` sets up and runs the main demo, `make test` sets up and runs the tests (and
# every benchmark in quick mode).
# Both create/refresh the virtual environment at .venv/ first (fast when it is up to date).
PY := .venv/bin/python

.PHONY: install demo test lint bench-quick benchmarks-doc

install:
	bash scripts/install.sh

demo: install
	$(PY) examples/offline_inference/basic_generate.py
	$(PY) examples/offline_inference/omni_text_to_image.py
	$(PY) examples/online_serving/omni_serve_demo.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Two pytest workers (pytest-xdist), each taking whole test files (module fixtures start once): run
# serially, the 2 cores sat 37% idle (spawned vLLM processes import single-threaded); 41-44 min serially,
# 27-42 min with two workers (docs/testing.md). Line coverage of vllm_omni (every process the tests
# start, see [tool.coverage] in pyproject.toml) is printed after the tests, then the 25 slowest tests
# (the suite should stay under ~30 min). pytest exits 5 when it collects no test: report it instead of
# failing. Then every benchmark in quick mode (bench-quick).
test: lint
	$(PY) -m pytest -n 2 --dist loadfile --cov --cov-report=term --durations=25; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc
	$(PY) benchmarks/report.py --quick

# Every benchmark's --quick run, one after another (about 13 min on 2 busy cores; engine starts and
# torch.compile warm-ups dominate): a crash fails, the numbers are printed, not checked.
bench-quick: install
	$(PY) benchmarks/report.py --quick

# Every benchmark's full run, one after another (an hour or more: run it on a quiet machine), then
# docs/benchmarks.md rewritten from benchmarks/results.json.
benchmarks-doc: install
	$(PY) benchmarks/report.py
