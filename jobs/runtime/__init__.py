"""The worker runtime: claim a job in PostgreSQL, keep its lease, run its steps in order, record every transition.

Runs in the worker process only (`arq jobs.worker.WorkerSettings`). Imports the shared core of `service` and the
job SDK (`service.jobtypes`); never the API (`service.api`) and never the CLI.
"""
