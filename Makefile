# Anywhere: `make test` and `make demo` work on a fresh Debian 12 machine (root or sudo for apt-get).
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all test demo venv system-deps clean

all: test

# Debian packages the tests use: iproute2 (ip netns, for the multi-host tests), systemd
# (systemd-analyze, for the unit checks), python3-venv.
system-deps:
	@missing=""; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	$(MAKE) system-deps
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -ra $(PYTEST_ARGS)

demo: $(STAMP)
	$(VPY) -m anywhere.demo

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
