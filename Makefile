# One command each: `make test` sets up and runs every check; `make run` sets up
# and runs `archiver run` on Prefect's embedded default database.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: test run demo services lint
DEMO ?= demo

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# PostgreSQL for the tests; started here when it is not running (S3 is a moto
# server the tests start themselves).
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || \
	  pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@for i in $$(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && exit 0; sleep 1; done; \
	  echo "PostgreSQL did not start on 127.0.0.1:5432" >&2; exit 1

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(BIN)/.installed services lint
	$(BIN)/pytest --require-backends

run: $(BIN)/.installed
	$(BIN)/archiver run $(ARGS)

# A fresh machine has no Prefect database: make one in $(DEMO)/ the way Prefect's
# embedded server lays it out (schema from Prefect's own migrations, a year of runs),
# then archive it with the embedded defaults (PREFECT_HOME=$(DEMO)).
demo: $(BIN)/.installed
	@mkdir -p $(DEMO)
	@test -f $(DEMO)/prefect.db || $(BIN)/python -m benchmarks.generate -q --create-schema \
	  --database-url sqlite:///$(DEMO)/prefect.db --runs 2000
	PREFECT_HOME=$(DEMO) $(BIN)/archiver run --yes $(ARGS)
	$(BIN)/python -c "import duckdb; print(duckdb.sql(\"SELECT month, count(*) AS flow_runs \
	  FROM read_parquet('$(DEMO)/archive/flow_run/*/*.parquet', hive_partitioning = true) \
	  GROUP BY month ORDER BY month\"))"
