"""The local stack of `scripts/dev`, the tests and the benchmark: Envoy's bootstrap from the
packaged config (envoy_config), Envoy run on ports of its own choice and read back
(envoy_process), child processes and the ports of those that cannot choose their own
(processes), the stack itself (devstack), `meshtoll dev` (dev, command) and the demo
upstream (demo_upstream)."""
