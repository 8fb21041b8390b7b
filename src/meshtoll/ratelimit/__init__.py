"""Rate limits and quotas: what a limit is, how a window is measured, how Envoy asks."""
