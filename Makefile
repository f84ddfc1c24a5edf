# Anywhere: `make test` and `make demo` work on a fresh Debian 12 machine (root or sudo for apt-get).
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all test demo venv system-deps clean
.PHONY: bench bench-fleet profile floor instructions

# Packages (packaging/build.py; Debian's python3, standard library only).  `make` builds the
# PyInstaller tarball; `make deb` / `make rpm` the packages; all go into $(DIST), scratch space is
# $(WORKDIR).  The tools they need (PyInstaller in its own venv build/venv, debhelper, rpmbuild,
# ...) are installed on first use.
.PHONY: tarball deb rpm packages package-deps lint-packages
BUILD_PYTHON ?= /usr/bin/python3
BUILD := $(BUILD_PYTHON) packaging/build.py
DIST ?= dist
WORKDIR ?= build
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' anywhere/common.py)
# The tarball's credential/ (made at build time, for this build only): CREDENTIALS=no leaves it out
# (the archive's checksum is then the same for every build of a commit); SERVER_NAME and
# SERVER_IPS (comma-separated) are the names in its server certificate.
CREDENTIALS ?= yes
SERVER_NAME ?= localhost
SERVER_IPS ?= 127.0.0.1,::1
# PKG_VERSION=V: build the .deb / .rpm as version V (default: anywhere's own, $(VERSION)).
PKG_VERSION ?=
comma := ,
TARBALL_FLAGS = --server-name $(SERVER_NAME) $(foreach ip,$(subst $(comma), ,$(SERVER_IPS)),--server-ip $(ip)) \
	$(if $(filter no,$(CREDENTIALS)),--no-credentials)

all: tarball

# dist/anywhere.tar.gz (+ dist/anywhere.tar.gz.sha256): unpack into /usr/local/anywhere
tarball:
	$(BUILD) tarball --out $(DIST) --work $(WORKDIR)/tarball $(TARBALL_FLAGS)

# dist/anywhere_VERSION_all.deb
deb:
	$(BUILD) deb --out $(DIST) --work $(WORKDIR)/deb $(if $(PKG_VERSION),--version $(PKG_VERSION))

# dist/anywhere-VERSION-1.noarch.rpm
rpm:
	$(BUILD) rpm --out $(DIST) --work $(WORKDIR)/rpm $(if $(PKG_VERSION),--version $(PKG_VERSION))

packages: tarball deb rpm

# every Debian package the builds and the linters need
package-deps:
	$(BUILD) deps all

# lintian and rpmlint on the packages, as the tests run them
lint-packages: deb rpm
	$(BUILD) deps lint
	lintian --pedantic --fail-on error,warning $(DIST)/anywhere_$(VERSION)_all.deb
	rpmlint -r packaging/rpm/anywhere.rpmlintrc $(DIST)/anywhere-$(VERSION)-1.noarch.rpm

# Debian packages the tests use: iproute2 (ip netns, for the multi-host tests), systemd
# (systemd-analyze, for the unit checks), systemd-container + debootstrap + zstd (the test
# under a real systemd, in systemd-nspawn), nftables (cutting one connection in the fault tests),
# haproxy (the load balancer in front of two servers: tests/test_haproxy.py; accept-proxy in
# tests/test_proxy_protocol.py), nginx (a PROXY protocol target: tests/test_proxy_protocol.py), iperf3
# (the bandwidth limit's measurements: tests/test_bandwidth.py), python3-venv.
system-deps:
	@missing=""; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v systemd-nspawn >/dev/null 2>&1 || missing="$$missing systemd-container"; \
	[ -x /usr/sbin/debootstrap ] || missing="$$missing debootstrap"; \
	command -v zstd >/dev/null 2>&1 || missing="$$missing zstd"; \
	command -v nft >/dev/null 2>&1 || missing="$$missing nftables"; \
	command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v iperf3 >/dev/null 2>&1 || missing="$$missing iperf3"; \
	command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || missing="$$missing dnsmasq-base"; \
	command -v dig >/dev/null 2>&1 || missing="$$missing bind9-dnsutils"; \
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

# The benchmark (not part of `make test`): installs iperf3, wrk, nginx, socat and OpenSSH from
# Debian's packages if missing, then runs bench/run.py (options: make bench BENCH_ARGS="--quick").
# Its metric h (interactive traffic behind bulk, across a tbf-shaped link between two network
# namespaces) needs root, ip and tc: alone, make bench BENCH_ARGS="--metrics h --quick".  Metric i
# (UDP: iperf3 -u at 100 and 500 Mbit/s, loss and jitter) runs on direct and Anywhere only (the
# other paths carry TCP only): alone, make bench BENCH_ARGS="--metrics i".
bench: $(STAMP)
	@missing=""; \
	command -v iperf3 >/dev/null 2>&1 || missing="$$missing iperf3"; \
	command -v wrk >/dev/null 2>&1 || missing="$$missing wrk"; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	command -v socat >/dev/null 2>&1 || missing="$$missing socat"; \
	[ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	command -v ssh >/dev/null 2>&1 || missing="$$missing openssh-client"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	$(VPY) bench/run.py $(BENCH_ARGS)

# A fleet on one server (issue 18; not part of `make test`): a fresh anywhered and N idle agent sessions
# (the project's agent code, many per process; certificates cached in ~/.cache/anywhere-bench-fleet),
# N = 60, 1,000, 5,000: anywhered's RSS per agent, idle CPU, admin API latency, restart to all back.
# make bench-fleet FLEET_ARGS="--quick" for 60 and 1,000 only.
bench-fleet: $(STAMP)
	$(VPY) bench/fleet.py $(FLEET_ARGS)

# Where the daemons' CPU goes under one load: py-spy (installed into the venv on first use) on
# anywhered and the agent, e.g. make profile PROFILE_ARGS="--load c10 --native".  Same tools as bench.
# `make floor`: what the same work costs with no tunnel logic (bench/floor.py), beside Anywhere.
profile: $(STAMP)
	@$(VENV)/bin/py-spy --version >/dev/null 2>&1 || $(VPY) -m pip install --quiet py-spy
	$(VPY) bench/cpuprofile.py $(PROFILE_ARGS)

floor: $(STAMP)
	$(VPY) bench/floor.py $(FLOOR_ARGS)

# `make instructions`: user-space instructions per request of both daemons under callgrind
# (bench/instructions.py), repeatable within ~2% on a noisy machine; compare with revisions, e.g.
# make instructions INSTR_ARGS="--rev HEAD~1".  Installs valgrind if missing.
instructions: $(STAMP)
	@command -v valgrind >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq valgrind; }
	$(VPY) bench/instructions.py $(INSTR_ARGS)
