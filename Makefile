# stepaudio2: one command to install, one to test, one to run (README, Quickstart).
SHELL := /bin/bash
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
# Use the active virtual environment when there is one, else .venv/ at the repo root.
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),$(ROOT)/.venv)
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.stepaudio2-installed
APT_PACKAGES := espeak-ng sox libsox-fmt-all redis-server
PROTO_SRC := $(shell find $(ROOT)/protos -name '*.proto' 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: install protos test demo bench tiny-checkpoint clean apt

install: $(STAMP) protos

# Debian packages the tests and demo need (espeak-ng/sox make test speech; redis for
# later issues). Installed only when we are root and they are missing.
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "apt: installing$$missing"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "apt: missing$$missing (not root: install them yourself)"; fi; \
	fi

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory apt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@mkdir -p $(ROOT)/services/v1 && touch $(ROOT)/services/v1/__init__.py
	$(PIP) install -q -e '$(ROOT)[test,local]'
	@touch $(STAMP)

# Generated code goes to services/v1 (import stepaudio2.v1); never committed or hand-edited.
protos: $(STAMP)
	@rm -rf $(ROOT)/.cache/protoc && mkdir -p $(ROOT)/.cache/protoc $(ROOT)/services/v1
	$(PY) -m grpc_tools.protoc -I $(ROOT)/protos --python_out=$(ROOT)/.cache/protoc \
	  --pyi_out=$(ROOT)/.cache/protoc --grpc_python_out=$(ROOT)/.cache/protoc $(PROTO_SRC)
	@cp $(ROOT)/.cache/protoc/stepaudio2/v1/* $(ROOT)/services/v1/
	@touch $(ROOT)/services/v1/__init__.py

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/stepaudio2 demo

bench: install
	$(PY) bench/decode.py
	$(PY) bench/load_memory.py
	$(PY) bench/synthesize.py

tiny-checkpoint: install
	$(VENV)/bin/stepaudio2 make-tiny-checkpoint $(ROOT)/.cache/tiny-checkpoint

clean:
	rm -rf $(ROOT)/services/v1 $(ROOT)/.cache

# Train the digit-ASR demo checkpoint (issue 5) on espeak-ng speech, CPU: the shipped recipe,
# 3000 steps (about 15-25 minutes on 2 cores), capped at 45 minutes.
train-demo: install
	$(VENV)/bin/stepaudio2 train-demo $(ROOT)/assets/demo-checkpoint --steps 3000 --minutes 45 --seed 0
	$(VENV)/bin/stepaudio2 eval-asr $(ROOT)/assets/eval-digits --model-dir $(ROOT)/assets/demo-checkpoint
