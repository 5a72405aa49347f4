# ftpipe: `make run` (whole pipeline on the demo task), `make test`, `make test-fast`, `make ui`, `make mlflow-ui`,
# `make serve`, `make bench`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TASK ?= ticket_triage
export DAGSTER_HOME := $(CURDIR)
export PYTHONUNBUFFERED := 1

.PHONY: install run test test-fast ui mlflow-ui serve bench model demo-data clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# pip would compile the installed modules to bytecode one file after another (two thirds of the install's time on 2
# cores); compileall does it on every core, ftpipe's own modules too (where PYTHONDONTWRITEBYTECODE is set, each
# process would compile them again). As under pip, a file that does not compile (torch's test helpers, in a newer
# Python's syntax) stays source only.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --no-compile -e '.[dev]'
	$(PY) -m compileall -q -j 0 $(VENV)/lib ftpipe >/dev/null || true
	touch $@

install: $(VENV)/.installed

model: install
	$(PY) -m ftpipe fetch-model

# SET="training.max_steps=10 split.seed=3" changes task.yaml settings for this run (read from the environment, so
# any quoting in the values reaches ftpipe as typed).
run: install model
	$(PY) -m ftpipe run $(TASK) $(if $(SET),--set "$$SET")

# One pytest worker per core, one torch thread per worker, the longest modules handed out first (conftest.py): the
# real-model demo runs beside the other tests from the start, and two torch processes never fight over the same cores.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -n auto --dist loadscope --no-loadscope-reorder --durations=15 ftpipe_tests

# The quick tests for iteration: everything but real trainings (`slow`) and whole stacks (`e2e`).
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -n auto --dist loadscope -m "not slow and not e2e" ftpipe_tests

# Without the notice that Dagster's dev command is superseded by `dg dev` (dagster-dg's project layout, which
# ftpipe does not use).
ui: export PYTHONWARNINGS := ignore:Function `dev_command` is superseded
ui: install
	$(VENV)/bin/dagster dev -h 127.0.0.1 -p 3000

# One web worker (MLFLOW_UI_WORKERS=4 on a big machine) and no GenAI job runners: two processes, about 0.5 GB.
mlflow-ui: install
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 \
		--workers "$${MLFLOW_UI_WORKERS:-1}" \
		--backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$${FTPIPE_HOME:-$(CURDIR)/.ftpipe}/mlflow.db}"

# Every task's champion (and `<task>@candidate`) through an OpenAI-compatible API; FTPIPE_API_KEY=... requires a key.
serve: install
	$(PY) -m ftpipe serve --host 127.0.0.1 --port $${PORT:-8000}

bench: install
	$(PY) bench/dedup.py
	$(PY) bench/split.py
	$(PY) bench/eval.py
	$(PY) bench/train.py
	$(PY) bench/eval_loss.py
	$(PY) bench/load.py
	$(PY) bench/convert.py
	$(PY) bench/executors.py
	$(PY) bench/pipeline.py
	$(PY) bench/replay.py
	$(PY) bench/replay.py --task intents
	$(PY) bench/dpo.py
	$(PY) bench/request_log.py

demo-data: install
	$(PY) data/generate_demo.py

clean:
	rm -rf .ftpipe .dagster
