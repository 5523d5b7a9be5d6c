"""Every job type the service offers: the composition root, imported by the API app and the worker themselves.

Adding a job type: write its module, add it to this list."""

from __future__ import annotations

from jobs import noop, pg_rebuild, pg_reinit, pg_restart, pg_switchover
from service.jobtypes import Registry

REGISTRY = Registry([noop.JOB, pg_rebuild.JOB, pg_switchover.JOB, pg_restart.JOB, pg_reinit.JOB])
