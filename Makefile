# synproxy: `make demo` runs the proxy on a built-in lab, `make test` runs the tests.
# Both set everything up themselves (apt packages, a venv, the package) and are
# quiet when that is already done.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# The interpreter the venv is made from: the distribution's, which Debian builds with PGO and
# LTO. A pyenv or source build without --enable-optimizations (first on PATH on some machines)
# ran the per-SYN path 24% slower here (7.3 against 5.5 µs, bench/bench_syn.py), so it is used
# only when there is no /usr/bin/python3. Override with `make PYTHON=...`.
PYTHON ?= $(firstword $(wildcard /usr/bin/python3) python3)
# NetfilterQueue is built from source (no wheel on PyPI): a compiler, Python headers and
# libnetfilter-queue-dev; Debian's python3 needs python3-venv for `python3 -m venv`.
APT_PACKAGES := libnetfilter-queue-dev libnfnetlink-dev iptables nftables iproute2 conntrack \
                hping3 tcpdump prometheus build-essential python3-dev python3-venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)-$(shell echo $(PYTHON) | sha256sum | cut -c1-6)

.PHONY: install apt-packages test demo bench clean

install: apt-packages $(STAMP)

apt-packages:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing apt packages:" $$missing; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml | apt-packages
	@want=$$($(PYTHON) -c 'import os, sys; print(os.path.realpath(sys.executable))'); \
	if [ -x $(PY) ] && [ "$$(readlink -f "$$($(PY) -c 'import sys; print(sys._base_executable)')")" != "$$want" ]; then \
	    echo "$(VENV) was made from another interpreter: remaking it from $$want"; rm -rf $(VENV); fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@echo "installing synproxy and its Python dependencies into $(VENV)"
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

# pytest exits 5 when it collected no test: that must fail, not pass.
test: install
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

demo: install
	@$(VENV)/bin/synproxy demo

# Micro-benchmark (per SYN/ACK/segment), the flood benchmark against the kernel's defences, and
# an established download during a flood, and new connections beside downloads under a paced flood,
# and downloads behind a congested link that marks or drops (ECN).
bench: install
	@$(PY) bench/bench_syn.py
	@$(PY) bench/flood.py
	@$(PY) bench/download_flood.py
	@$(PY) bench/mixed_flood.py
	@$(PY) bench/ecn_aqm.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
