"""What meshtoll's image and the files that run it agree on (the Dockerfile, the compose
file, the Kubernetes manifests): where the policy is mounted, how readiness is asked,
which Redis image keeps the state beside it."""

from __future__ import annotations

POLICY_DIR = "/etc/meshtoll/policy"
REDIS_IMAGE = "redis:7.4.2-alpine"

# Readiness in the image's own Python (the slim image has no curl): exit 0 only on a 200.
# The Dockerfile's HEALTHCHECK says the same (a test compares them).
READY_CHECK = (
    "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' "
    "% os.environ.get('MESHTOLL_ADMIN_PORT', '8090'), timeout=2)"
)
