# make run: set up .venv and start the service in the foreground (extra flags: ARGS='...').
# make test: install what the tests need, start a private dockerd, run the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Three workers on CI's two cores: the tests mostly wait (on docker, timers, steady traffic
# through nginx), a whole run keeps about 40 % of two cores busy. Each test file whole on one
# worker: a file's tests share its set-up (the e2e APPOs' engines and addresses, the RPM
# build); files handed out in the order tests/conftest.py gives, the two e2e files first, one
# to each worker. PYTEST_WORKERS= (empty) runs everything in one process.
PYTEST_WORKERS ?= -n 3 --dist loadfile --no-loadscope-reorder

.PHONY: run test venv test-venv deps rpm bench bench-scale bench-lua bench-entry bench-failover clean e2e

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: apt-get install -y python3-venv" >&2; exit 1; }
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed requirements-test.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed
test-venv: $(VENV)/.test-installed

run: venv
	$(VENV)/bin/container-healthcheck serve $(ARGS)

deps:
	scripts/install-deps

# Every daemon the tests started is stopped afterwards, whether they passed, failed or were
# interrupted: the private engine here, the e2e APPOs' engines (appo2-appo7) by their fixtures.
test: deps test-venv
	host=$$(scripts/dockerd-up default) && trap 'for engine in default appo2 appo3 appo4 appo5 appo6 appo7 fault; do scripts/dockerd-down $$engine & done; wait' EXIT && DOCKER_HOST=$$host $(PY) -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS) tests

rpm: venv
	PYTHON=$(CURDIR)/$(PY) scripts/build-rpm

bench: deps venv
	host=$$(scripts/dockerd-up default) && DOCKER_HOST=$$host PATH=$(CURDIR)/$(VENV)/bin:$$PATH scripts/bench
	host=$$(scripts/dockerd-up default) && DOCKER_HOST=$$host PATH=$(CURDIR)/$(VENV)/bin:$$PATH scripts/bench-scale
	scripts/bench-lua
	scripts/bench-entry
	scripts/bench-failover

bench-scale: deps venv
	host=$$(scripts/dockerd-up default) && DOCKER_HOST=$$host PATH=$(CURDIR)/$(VENV)/bin:$$PATH scripts/bench-scale

bench-lua: deps
	scripts/bench-lua

bench-entry: deps
	scripts/bench-entry

bench-failover: deps test-venv
	scripts/bench-failover

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
