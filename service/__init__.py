"""ApiOps: an HTTP API that runs operational jobs durably, step by step, on arq workers."""
