"""Job types and the worker that runs them (`arq jobs.worker.WorkerSettings`)."""
