# ApiOps: `make run` serves the API and a worker; `make test` runs every check. `make help` lists the rest.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

PG_HOST ?= 127.0.0.1
PG_PORT ?= 5432
REDIS_HOST ?= 127.0.0.1
REDIS_PORT ?= 6379
JOB ?= rebuild

.PHONY: help install services browser migrate run test lint typecheck pytest clean demo bench

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create the virtualenv and install the project with its dev tools

services: ## start local PostgreSQL and Redis if they are installed but down
	@if ! pg_isready -q -h $(PG_HOST) -p $(PG_PORT) 2>/dev/null; then \
	  if ! command -v pg_ctlcluster >/dev/null; then \
	    echo "PostgreSQL is not running on $(PG_HOST):$(PG_PORT) and not installed: apt-get install postgresql redis-server" >&2; exit 1; fi; \
	  echo "starting PostgreSQL"; pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | sort -V | tail -1) main start; \
	  for i in $$(seq 50); do pg_isready -q -h $(PG_HOST) -p $(PG_PORT) && break; sleep 0.2; done; \
	  pg_isready -h $(PG_HOST) -p $(PG_PORT) >/dev/null || { echo "PostgreSQL did not come up" >&2; exit 1; }; fi
	@if ! redis-cli -h $(REDIS_HOST) -p $(REDIS_PORT) ping >/dev/null 2>&1; then \
	  if ! command -v redis-server >/dev/null; then \
	    echo "Redis is not running on $(REDIS_HOST):$(REDIS_PORT) and not installed: apt-get install redis-server" >&2; exit 1; fi; \
	  echo "starting Redis"; mkdir -p /var/lib/redis /var/log/redis; \
	  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port $(REDIS_PORT) --save "" --appendonly no \
	    --dir /var/lib/redis --logfile /var/log/redis/ci.log; \
	  for i in $$(seq 50); do redis-cli -h $(REDIS_HOST) -p $(REDIS_PORT) ping >/dev/null 2>&1 && break; sleep 0.2; done; \
	  redis-cli -h $(REDIS_HOST) -p $(REDIS_PORT) ping >/dev/null || { echo "Redis did not come up" >&2; exit 1; }; fi

# Root installs directly; anyone else through sudo. Idempotent: nothing is fetched once chromium is there.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
browser: ## Debian's chromium and chromedriver, for the console's browser tests (installed once)
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo "installing Debian's chromium and chromium-driver"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; fi

migrate: install services ## create the database if missing and apply the migrations
	$(BIN)/apiops db upgrade

run: migrate ## serve the API on 127.0.0.1:8080 with a worker, in the foreground (Ctrl-C stops both)
	$(BIN)/apiops run

demo: migrate ## rebuild replica pg-1 of a simulated cluster (JOB=switchover|restart|reinit|cnpg-rebuild|cnpg-switchover|cnpg-restart) via the API, live
	$(BIN)/python -m tests.demo $(JOB)

bench: install services ## the service against the floor of its stack (own database); prints a table, writes var/bench.json
	$(BIN)/python -m tests.bench --out var/bench.json

lint: install ## ruff (lint and format check) and the import contracts of pyproject.toml
	$(BIN)/ruff check service jobs tests alembic
	$(BIN)/ruff format --check service jobs tests alembic
	$(BIN)/lint-imports --no-logo

typecheck: install ## mypy --strict over service, jobs and tests
	$(BIN)/mypy

pytest: install services browser ## the test suite alone (real PostgreSQL, Redis and Chromium)
	$(BIN)/pytest

test: lint typecheck pytest ## everything CI runs: lint, typecheck, tests

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .grimp_cache *.egg-info
