"""Load tests of the NCF service with Locust, and the serving benchmarks built on them.

workload.py      the request mix and what counts as a correct answer (no Locust)
locustfile.py    TorchServeUser, SageMakerUser; shape.py: the step load
run.py           `make loadtest`: readiness check, a headless run, the results folder
report.py        Locust's CSVs -> summary.json, plots, report.md
torchserve.py    readiness, Prometheus counters, model registration, a private server
null_handler.py  a handler that answers a constant: TorchServe's own ceiling
bench.py         compare (ncf vs null), soak, kill -9; grid.py: the batch-settings grid
"""
