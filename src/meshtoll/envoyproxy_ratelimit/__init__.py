"""Compatibility with envoyproxy/ratelimit, the Envoy project's own rate-limit service (Go),
so that meshtoll replaces it without changing what it was given: its configuration files
(config_files, descriptor_tree), its answers counted as it counts (strict, response_extras),
its per-limit statistics (stats), its environment variables (environment) and its HTTP
`/json` endpoint (json_endpoint). domains answers every configured domain, as strictly as
that project or meshtoll's way, by choice."""
