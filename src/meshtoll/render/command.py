"""`meshtoll render` on the command line: its flags (a few deployment parameters) and the
call into render.files. The CLI's parser adds it with add_render_command."""

from __future__ import annotations

import argparse
from pathlib import Path

from meshtoll.render.files import TARGETS, run_render
from meshtoll.render.params import DeployParams, parse_selector


def add_render_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`meshtoll render` on the CLI's command parser: one flag per DeployParams field."""
    defaults = DeployParams()
    render = commands.add_parser(
        "render",
        help="generate the deployment files (Istio, Kubernetes, Envoy, docker-compose) from a few parameters",
    )
    render.add_argument("targets", nargs="+", choices=[*TARGETS, "all"], help="what to render")
    render.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the files under this root (deploy/..., docker-compose.yml); without it, print "
        "what to apply as one YAML stream (meshtoll render istio | kubectl apply -f -)",
    )
    render.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file under --out (default .) differs"
    )
    render.add_argument("--namespace", default=defaults.namespace, help="meshtoll's namespace")
    render.add_argument(
        "--gateway-namespace", default=defaults.gateway_namespace, help="the gateway's namespace"
    )
    gateway = render.add_mutually_exclusive_group()
    gateway.add_argument(
        "--gateway-selector",
        default="=".join(defaults.gateway_selector),
        help="gateway pod label, key=value (istioctl: istio=ingressgateway; Helm: often istio=ingress)",
    )
    gateway.add_argument("--gateway-ref", default=None, help="a Gateway API Gateway's name (targetRefs)")
    render.add_argument(
        "--gateway-service-account",
        default=None,
        help="the gateway pods' service account (default istio-ingressgateway, or <gateway-ref>-istio)",
    )
    render.add_argument(
        "--service", default=None, help="meshtoll's FQDN (default meshtoll.<namespace>.svc.cluster.local)"
    )
    for flag, field in (
        ("--grpc-port", "grpc_port"),
        ("--http-authz-port", "http_authz_port"),
        ("--admin-port", "admin_port"),
        ("--listen-port", "listen_port"),
    ):
        render.add_argument(
            flag,
            dest=field,
            type=int,
            default=getattr(defaults, field),
            help=f"default {getattr(defaults, field)}",
        )
    render.add_argument(
        "--meshtoll-host", default=defaults.meshtoll_host, help="envoy, compose: meshtoll's host name"
    )
    render.add_argument(
        "--upstream-host", default=defaults.upstream_host, help="envoy, compose: the upstream's host name"
    )
    render.add_argument(
        "--upstream-port", type=int, default=defaults.upstream_port, help=f"default {defaults.upstream_port}"
    )
    render.add_argument(
        "--collector-host",
        default=defaults.collector_host,
        help="the OpenTelemetry collector (OTLP/gRPC) Envoy and meshtoll trace to (default otel-collector)",
    )
    render.add_argument(
        "--collector-port",
        type=int,
        default=defaults.collector_port,
        help=f"default {defaults.collector_port}",
    )
    render.add_argument(
        "--trace-sampling-percent",
        type=float,
        default=defaults.trace_sampling_percent,
        help="share of requests the gateway traces (default 1; a sampled traceparent is always followed)",
    )
    render.add_argument("--istio-version", default=defaults.istio_version, help="the oldest Istio to support")
    render.add_argument("--image", default=defaults.image, help="meshtoll's container image")
    render.add_argument(
        "--authz-transport",
        choices=["http", "grpc"],
        default=defaults.authz_transport,
        help="the ext_authz provider the gateway's AuthorizationPolicy names (default http, the fast path)",
    )
    render.add_argument(
        "--api-key-query-param",
        default=None,
        metavar="NAME",
        help="envoy, istio: the policy's auth.api_key_query_param, removed by the gateway after HTTP "
        "ext_authz (an HTTP authorization answer cannot ask for it)",
    )
    render.set_defaults(command=_render)


def _render(args: argparse.Namespace) -> int:
    params = DeployParams(
        namespace=args.namespace,
        gateway_namespace=args.gateway_namespace,
        gateway_selector=parse_selector(args.gateway_selector),
        gateway_ref=args.gateway_ref,
        gateway_service_account=args.gateway_service_account,
        service=args.service,
        grpc_port=args.grpc_port,
        http_authz_port=args.http_authz_port,
        admin_port=args.admin_port,
        listen_port=args.listen_port,
        meshtoll_host=args.meshtoll_host,
        upstream_host=args.upstream_host,
        upstream_port=args.upstream_port,
        istio_version=args.istio_version,
        image=args.image,
        authz_transport=args.authz_transport,
        api_key_query_param=args.api_key_query_param,
        collector_host=args.collector_host,
        collector_port=args.collector_port,
        trace_sampling_percent=args.trace_sampling_percent,
    )
    targets = list(TARGETS) if "all" in args.targets else list(dict.fromkeys(args.targets))
    return run_render(targets, params, args.out, args.check)
