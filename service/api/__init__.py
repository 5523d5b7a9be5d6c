"""The API process: the Starlette app, its routes, authentication, the event hub and the API's reads and writes.

Runs under uvicorn (`apiops serve`). Imports the shared core of `service` and the job-type registry; never the
worker runtime (`jobs.runtime`, `jobs.worker`) and never the CLI.
"""
