# NCF recommendation service. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export NCF_DATA_DIR ?= data
DATASET ?= demo
MODEL ?= neumf-pre
ARTIFACT_DIR ?= artifacts/$(DATASET)-$(MODEL)
TRAIN_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test lint data train evaluate bench-train clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed ## create .venv with the pinned requirements

test: install ## run the test suite
	$(PY) -m pytest -q

lint: install ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

data: install ## download DATASET into $(NCF_DATA_DIR)/DATASET (demo needs none)
	$(PY) -m training.download $(DATASET)

train: install ## train MODEL on DATASET, artifact to ARTIFACT_DIR
	$(PY) -m training.train --dataset $(DATASET) --model $(MODEL) --out $(ARTIFACT_DIR) $(TRAIN_ARGS)

evaluate: install ## recompute the metrics of ARTIFACT_DIR
	$(PY) -m training.evaluate $(ARTIFACT_DIR)

bench-train: install ## the four-model ml-1m table -> bench/results/train-ml-1m.json
	$(PY) -m bench.train_table --dataset ml-1m

# --- AWS (deploy/) ---
# Settings from the environment (AWS_REGION, SAGEMAKER_ROLE_ARN, NCF_S3_BUCKET, ...; see
# deploy/README.md) or DEPLOY_ARGS, e.g. make deploy DEPLOY_ARGS="--update --max-instances 4".
DEPLOY_ARGS ?=
USER_ID ?= 1
K ?= 10
# DATASET/MODEL go to SageMaker only when given (make train-job DATASET=ml-1m).
SM_TRAIN_ARGS = $(if $(filter command line environment,$(origin DATASET)),--dataset $(DATASET)) \
	$(if $(filter command line environment,$(origin MODEL)),--model $(MODEL))
.PHONY: package push deploy invoke train-job pipeline cleanup

package: install ## model-store/ncf.mar (+ ARTIFACT_DIR metadata) -> S3 model.tar.gz
	$(PY) -m deploy package $(if $(wildcard $(ARTIFACT_DIR)/metadata.json),--artifact $(ARTIFACT_DIR)) $(DEPLOY_ARGS)

push: install ## push the local image to ECR (repository created if missing)
	$(PY) -m deploy push $(DEPLOY_ARGS)

deploy: install ## create the SageMaker endpoint (DEPLOY_ARGS=--update: blue/green)
	$(PY) -m deploy deploy $(DEPLOY_ARGS)

invoke: install ## recommendations for USER_ID from the endpoint
	$(PY) -m deploy invoke --user-id $(USER_ID) --k $(K) $(DEPLOY_ARGS)

train-job: install ## run training as a SageMaker training job
	$(PY) -m deploy train-job $(SM_TRAIN_ARGS) $(DEPLOY_ARGS)

pipeline: install ## upsert and start the SageMaker Pipeline (train, evaluate, register)
	$(PY) -m deploy pipeline $(SM_TRAIN_ARGS) $(DEPLOY_ARGS)

cleanup: install ## delete this project's endpoint, configs, models (DEPLOY_ARGS="--s3 --ecr")
	$(PY) -m deploy cleanup $(DEPLOY_ARGS)

clean: ## remove build outputs (keeps .venv and data)
	rm -rf artifacts model-store logs .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
