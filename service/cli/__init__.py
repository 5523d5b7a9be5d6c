"""The `apiops` command: process supervision (`run`, `serve`, `db upgrade`, `keys new`) and the API's client.

The client commands speak HTTP only (`service.cli.client`); they import neither the API nor the worker.
"""
