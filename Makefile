# SLED edge serving. `make demo` and `make test` do all set-up themselves on a fresh Debian machine.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
# On a machine without a local CPU wheel, TORCH_INDEX=https://download.pytorch.org/whl/cpu avoids a multi-GB CUDA build.
TORCH_INDEX ?=
MODELS      ?= models/build/tiny
SLED_MQTT_URL ?= mqtt://127.0.0.1:1883
PYTEST_ARGS ?=

.PHONY: help setup system-deps test demo models broker inspect clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

system-deps: ## apt-get install mosquitto, its clients and python3-venv when missing
	@./scripts/system-deps.sh

$(VENV)/.installed: pyproject.toml
	@./scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet 'torch==2.13.0' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install --quiet -e '.[verifier,models,test]'
	@touch $@

setup: $(VENV)/.installed ## venv with pinned dependencies, plus system packages

test: setup ## run the test suite (starts its own Mosquitto on a free port)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup ## broker + verifier + three heterogeneous edge devices on this machine
	$(PY) scripts/demo.py --models $(MODELS)

models: setup ## build the demo model family into $(MODELS)
	$(PY) -m sled_models.tiny --out $(MODELS)

broker: ## run the dev Mosquitto in the foreground on 127.0.0.1:1884
	mosquitto -c broker/mosquitto-dev.conf

inspect: setup ## print every SLED message on $(SLED_MQTT_URL)
	$(VENV)/bin/sled-inspect --mqtt-url $(SLED_MQTT_URL)

clean: ## remove the venv, builds and caches
	rm -rf $(VENV) build models/build .pytest_cache *.egg-info
