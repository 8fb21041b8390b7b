"""The local stack of `scripts/dev`, the tests and the benchmark: Envoy's bootstrap from the
packaged config (envoy_config), child processes on free loopback ports (processes,
devstack), `meshtoll dev` (dev) and the demo upstream (demo_upstream)."""
