"""`make bench`: the service against the floor of its own stack (raw asyncpg + arq), on this machine.

`python -m tests.bench [--quick] [--out FILE.json]`. Everything runs on a database (`apiops_bench`), a Redis db
index (14) and queues of its own, recreated or flushed at start; nothing else is touched. See docs/benchmark.md
for what each figure means.
"""
