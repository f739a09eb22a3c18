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
.PHONY: help install test lint data train evaluate bench-train bench-train-raw clean

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

bench-train-raw: install ## NeuMF on each raw MovieLens release in NCF_DATA_DIR vs popularity
	$(PY) -m bench.train_table --raw

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

# --- serving ---
# ARTIFACT picks what `make archive` packs (default ARTIFACT_DIR, i.e. DATASET/MODEL).
# Without one there, archive trains it first: the demo for DEMO_TRAIN_ARGS epochs (under a
# minute), any other dataset with the full `make train`. SERVE_ARGS go to archive.server,
# e.g. SERVE_ARGS="--set inference_address=http://127.0.0.1:9080".
ARTIFACT ?= $(ARTIFACT_DIR)
MODEL_STORE ?= model-store
DEMO_TRAIN_ARGS ?= --epochs 10 --pretrain-epochs 2
SERVE_ARGS ?=
.PHONY: archive serve stop logs bench-serve

archive: install ## model-store/ncf.mar from ARTIFACT (trains the demo model first if missing)
	@if [ ! -f "$(ARTIFACT)/metadata.json" ]; then \
		if [ "$(ARTIFACT)" != "$(ARTIFACT_DIR)" ]; then echo "no artifact at $(ARTIFACT)" >&2; exit 1; fi; \
		$(MAKE) --no-print-directory train $(if $(filter demo,$(DATASET)),TRAIN_ARGS="$(TRAIN_ARGS) $(DEMO_TRAIN_ARGS)"); \
	fi
	$(PY) -m archive.build --artifact $(ARTIFACT) --out $(MODEL_STORE)

serve: install ## start TorchServe in the background, wait until READY, print a curl line
	@[ -f "$(MODEL_STORE)/ncf.mar" ] || $(MAKE) --no-print-directory archive
	$(PY) -m archive.server start --model-store $(MODEL_STORE) $(SERVE_ARGS)

stop: ## stop the TorchServe of make serve; checks no Java or worker process is left
	$(PY) -m archive.server stop

logs: ## the last lines of the TorchServe logs (logs/)
	@$(PY) -m archive.server logs

bench-serve: install ## Recommender vs plain forward latency -> bench/results/serve.json, .png
	$(PY) -m bench.serve

# --- container (docker/) ---
# IMAGE:TAG is what `make push` pushes (NCF_LOCAL_IMAGE). BASE_IMAGE empty: the Dockerfile's
# CUDA base; BASE_IMAGE=debian:bookworm-slim builds a CPU image. WHEELHOUSE=DIR installs
# the Python packages from DIR's wheels only (offline). CONTAINER_ENGINE: docker when its
# daemon answers, else podman. docker-serve serves MODEL_STORE (ncf.mar, or an artifact);
# CONTAINER_ARGS go to `run`, e.g. CONTAINER_ARGS="-e SAGEMAKER_MODEL_SERVER_WORKERS=2".
IMAGE ?= ncf-recommender
TAG ?= latest
BASE_IMAGE ?=
WHEELHOUSE ?=
CONTAINER_ENGINE ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)
CONTAINER_PORT ?= 8080
CONTAINER_ARGS ?=
.PHONY: docker-build docker-serve test-container

docker-build: ## build IMAGE:TAG from docker/Dockerfile (BASE_IMAGE, WHEELHOUSE)
	$(CONTAINER_ENGINE) build -f docker/Dockerfile -t $(IMAGE):$(TAG) \
		$(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
		$(if $(WHEELHOUSE),--build-context wheelhouse=$(abspath $(WHEELHOUSE))) .

docker-serve: ## run the image's `serve` on CONTAINER_PORT, MODEL_STORE at /opt/ml/model
	@[ -f "$(MODEL_STORE)/ncf.mar" ] || [ -f "$(MODEL_STORE)/metadata.json" ] || \
		$(MAKE) --no-print-directory archive
	@engine=$(CONTAINER_ENGINE); gpus=; \
	if nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then \
		if [ "$$engine" = docker ]; then gpus="--gpus all"; else gpus="--device nvidia.com/gpu=all"; fi; \
	fi; \
	set -x; $$engine run --rm --name ncf-serve --network host $$gpus \
		-e SAGEMAKER_BIND_TO_PORT=$(CONTAINER_PORT) $(CONTAINER_ARGS) \
		-v "$(abspath $(MODEL_STORE))":/opt/ml/model:ro $(IMAGE):$(TAG) serve

test-container: install ## build and test the image in real podman containers (minutes)
	$(PY) -m pytest -q -m container tests/test_container.py

# --- load testing (loadtest/) ---
# loadtest: headless Locust against HOST (default: the server of `make serve`) or the
# SageMaker endpoint ENDPOINT -> loadtest/results/<timestamp>/, loadtest/results/latest.
# ARTIFACT is the served model's artifact: its users and their activity make the request mix.
# SHAPE=step: 1, 2, 4 ... 64 users, STEP_TIME s each (USERS and DURATION unused).
# LOADTEST_ARGS: more options of loadtest/run.py (or of the bench-* commands), e.g.
# LOADTEST_ARGS="--cold-share 0.2 --path /invocations". The bench-serve-grid, bench-loadtest,
# soak and chaos targets start a private TorchServe for ARTIFACT on free loopback ports.
HOST ?=
ENDPOINT ?=
USERS ?= 32
SPAWN_RATE ?= $(USERS)
DURATION ?= 60
SHAPE ?= constant
STEP_TIME ?= 15
LOADTEST_ARGS ?=
GRID_DURATION ?= 10
SOAK_DURATION ?= 600
.PHONY: loadtest bench-serve-grid bench-loadtest soak chaos

loadtest: install ## Locust (HOST or ENDPOINT, USERS, SPAWN_RATE, DURATION, SHAPE) -> loadtest/results/latest
	$(PY) -m loadtest.run --artifact $(ARTIFACT) $(if $(HOST),--host $(HOST)) \
		$(if $(ENDPOINT),--endpoint $(ENDPOINT)) --users $(USERS) --spawn-rate $(SPAWN_RATE) \
		--duration $(DURATION) --shape $(SHAPE) --step-time $(STEP_TIME) $(LOADTEST_ARGS)

bench-serve-grid: install ## batchSize x maxBatchDelay x workers, and the null handler -> bench/results/serve-grid.*
	$(PY) -m loadtest.grid --artifact $(ARTIFACT) --users $(USERS) --duration $(GRID_DURATION) $(LOADTEST_ARGS)

bench-loadtest: install ## USERS on ncf and on the null handler, one run -> bench/results/loadtest-compare.json
	$(PY) -m loadtest.bench compare --artifact $(ARTIFACT) --users $(USERS) --duration $(DURATION) $(LOADTEST_ARGS)

soak: install ## SOAK_DURATION s at USERS, worker RSS at start and end -> bench/results/loadtest-soak.json
	$(PY) -m loadtest.bench soak --artifact $(ARTIFACT) --users $(USERS) --duration $(SOAK_DURATION) $(LOADTEST_ARGS)

chaos: install ## kill -9 the worker during a run at USERS -> bench/results/loadtest-kill.json
	$(PY) -m loadtest.bench kill --artifact $(ARTIFACT) --users $(USERS) --duration $(DURATION) $(LOADTEST_ARGS)

clean: ## remove build outputs (keeps .venv and data)
	rm -rf artifacts model-store logs .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
