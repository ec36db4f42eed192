# The commands the README names. `make demo` and `make test` are the two a new machine needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PY := .venv/bin/python
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/trainer:$(CURDIR)
# An older Go on the machine fetches the toolchain hack/localcluster/go.mod pins from the module proxy.
export GOTOOLCHAIN ?= auto
CLUSTER_DIR ?= .localcluster
PYTEST_ARGS ?=
# No reruns: a test that passes only on a retry is a bug, in the product or in the test, to be found at its
# cause. pytest-rerunfailures stays for diagnosis only: `make test RERUNS='--reruns 3'` tells an intermittent
# failure from a steady one, and lists every retry in the summary (-ra: R lines).
RERUNS ?=

.PHONY: help
help: ## List the commands
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

.PHONY: deps
deps: ## Install the machine's tools the tests use (Debian packages, Go), if missing
	@bash hack/deps.sh

.PHONY: venv
venv: ## Make the Python environment (shared, cached outside the repo) and this checkout's .venv
	@bash hack/venv.sh

.PHONY: bins
bins: deps venv ## Build the local cluster's binaries, its node's and Kueue from Go modules (cached; the first build takes a long while)
	@$(PY) hack/localcluster/localcluster.py build --with-node
	@$(PY) hack/localcluster/kueue.py build >/dev/null

.PHONY: demo
demo: bins ## Bring up the local cluster and run a demo fine-tune end to end
	@bash hack/demo.sh

.PHONY: test
test: bins ## Run every test: unit, local cluster, end to end (GPU tests skip without a GPU)
	$(PY) -m pytest -ra $(RERUNS) $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: deps venv ## Run the unit tests only (no cluster)
	$(PY) -m pytest -ra tests/unit $(PYTEST_ARGS)

.PHONY: test-e2e
test-e2e: bins ## Run the end-to-end tests only (operator + real trainer on the local cluster)
	$(PY) -m pytest -ra -m e2e $(PYTEST_ARGS)

.PHONY: cluster
cluster: bins ## Start the local cluster (control plane, kubelet, containerd) with the project's images on its node (idempotent)
	$(PY) hack/localcluster/localcluster.py up --dir $(CLUSTER_DIR)
	$(PY) hack/localcluster/localcluster.py load --dir $(CLUSTER_DIR) operator trainer

.PHONY: cluster-down
cluster-down: ## Stop the local cluster and remove its state
	@if [ -x $(PY) ]; then $(PY) hack/localcluster/localcluster.py down --dir $(CLUSTER_DIR); fi

.PHONY: cluster-status
cluster-status: venv ## Show the local cluster's components and their memory
	$(PY) hack/localcluster/localcluster.py status --dir $(CLUSTER_DIR)

.PHONY: crds
crds: venv ## Regenerate crds/ (and the chart's copy) from the pydantic API models
	$(PY) -m qlora_operator.crdgen

.PHONY: bench
bench: venv ## Trainer speed on a CUDA GPU: the guide's recipe against the defaults
	$(PY) bench/trainer_speed.py

# Images for a real cluster: built with whichever builder the machine has, tagged for REGISTRY (the chart's
# defaults are ghcr.io/qlora-operator); `make push REGISTRY=registry.example.com/ml` pushes them there.
# BUILDER=docker|podman|buildah picks one; BASE_IMAGE_TRAINER/BASE_IMAGE_OPERATOR override the bases
# (docs/images.md). The local cluster builds its own with hack/localcluster/images.py.
REGISTRY ?= ghcr.io/qlora-operator
VERSION ?= $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' charts/qlora-operator/Chart.yaml)
# A docker client counts only with a daemon that answers.
BUILDER ?= $(or $(shell docker info >/dev/null 2>&1 && echo docker),$(shell command -v podman >/dev/null && echo podman),$(shell command -v buildah >/dev/null && echo buildah))
OPERATOR_IMAGE = $(REGISTRY)/qlora-operator:$(VERSION)
TRAINER_IMAGE = $(REGISTRY)/qlora-trainer:$(VERSION)
# buildah: chroot isolation needs no runc or crun; docker format keeps HEALTHCHECK.
BUILD = $(if $(filter buildah,$(BUILDER)),bud --layers --isolation chroot --format docker,build)
BUILD_ARGS = $(if $(BASE_IMAGE_$(1)),--build-arg BASE_IMAGE=$(BASE_IMAGE_$(1)))

.PHONY: images
images: ## Build the operator and trainer images with docker, podman or buildah (REGISTRY=..., VERSION=...)
	@[ -n "$(BUILDER)" ] || { echo "images: no docker, podman or buildah on PATH; install one" >&2; exit 1; }
	$(BUILDER) $(BUILD) $(call BUILD_ARGS,OPERATOR) \
	  -f Dockerfile.operator -t $(OPERATOR_IMAGE) .
	$(BUILDER) $(BUILD) $(call BUILD_ARGS,TRAINER) \
	  -f Dockerfile.trainer -t $(TRAINER_IMAGE) .
	@echo "images: $(OPERATOR_IMAGE) $(TRAINER_IMAGE); helm: --set image.repository=$(REGISTRY)/qlora-operator,image.tag=$(VERSION),trainer.image=$(TRAINER_IMAGE)"

.PHONY: push
push: images ## Push both images to REGISTRY (e.g. make push REGISTRY=registry.example.com/ml)
	$(BUILDER) push $(OPERATOR_IMAGE)
	$(BUILDER) push $(TRAINER_IMAGE)
