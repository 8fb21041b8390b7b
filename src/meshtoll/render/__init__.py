"""`meshtoll render`: every deployment file, generated from a few parameters.

    params.py      DeployParams: namespace, gateway, service name, ports, versions
    documents.py   YAML out: a header comment, then one or more documents
    istio.py       deploy/istio: mesh-config providers, AuthorizationPolicy, EnvoyFilters,
                   Telemetry, in-mesh access
    kubernetes.py  deploy/k8s: the kustomize base (and which overlay goes where)
    overlays.py    deploy/k8s/overlays: in-cluster Redis; the gateway-sidecar shape
    k8s_objects.py what base and overlays share: names, labels, environment, Secret
    envoy.py       deploy/envoy/envoy.yaml: a plain Envoy in front of meshtoll by host name
                   (or, in the gateway-sidecar overlay, over Unix sockets)
    container.py   what the image, the compose file and the manifests agree on
    compose.py     docker-compose.yml
    files.py       which target writes which file; write, or check what is checked in
    command.py     `meshtoll render`'s flags, for the CLI's parser

The Envoy filters come from the local stack's bootstrap (envoy/local.yaml, tested end to
end), so that the gateway and the tests ask Envoy for the same thing; nothing under
deploy/ is edited by hand (tests/test_render.py compares it with a fresh render).
"""
