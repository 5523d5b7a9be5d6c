"""PostgreSQL on Kubernetes: what every `pg-*` job type shares.

- `cluster`: a Patroni cluster as a step sees it, and the health checks of its members (or why a job goes by labels);
- `handover`: moving the leadership, crash-safe (pg-switchover, pg-restart);
- `patroni`: the one client of Patroni's REST API, through the pod proxy;
- `kube`: one kubernetes-asyncio ApiClient per context per worker process, and typed views of what it reads;
- `profiles`: the label conventions of the operators (Zalando/Spilo, CloudNativePG, Patroni, PGO, StackGres);
- `waiting`: cooperative waits that say what they wait for and fail fast on what will not heal;
- `cnpg`: CloudNativePG's `Cluster` resource, read and asked to switch over;
- `params`: the cluster params and settings every pg-* job type shares;
- `settings`: their settings (`APIOPS_KUBE_*`).
"""
