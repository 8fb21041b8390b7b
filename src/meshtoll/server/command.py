"""`meshtoll serve` and `meshtoll ratelimit` on the command line: serve's flags (one per
Settings field), the checks that run before any worker starts, and the RLS alone from
envoyproxy/ratelimit's environment variables. The CLI's parser adds them with
add_serve_command and add_ratelimit_command; the servers are imported only when run."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable

from meshtoll.errors import PolicyError
from meshtoll.policy import load_policy
from meshtoll.settings import Settings, boolean, settings_from


def add_serve_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="run the services Envoy calls")
    _settings_flags(serve)
    serve.set_defaults(command=_serve)


def add_ratelimit_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ratelimit = commands.add_parser(
        "ratelimit",
        help="run the rate-limit service alone, configured like envoyproxy/ratelimit "
        "(its environment variables: RUNTIME_ROOT, REDIS_URL, GRPC_PORT, ...)",
    )
    ratelimit.set_defaults(command=_ratelimit)


def _settings_flags(serve: argparse.ArgumentParser) -> None:
    """One flag per Settings field: --field-name, its help and parser from the field. None
    when not given, so that settings_from can tell a flag from the environment."""
    for field in dataclasses.fields(Settings):
        meta = field.metadata
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        help_text = f"{meta['help']} (env {Settings.env_name(field.name)}, default {field.default})"
        if meta["parse"] is boolean:
            serve.add_argument(flag, dest=field.name, action="store_true", default=None, help=help_text)
        elif isinstance(field.default, tuple):  # a list: the flag repeats, each one adds
            serve.add_argument(
                flag,
                dest=field.name,
                action="extend",
                type=_flag_value(meta["parse"]),
                default=None,
                metavar=meta["metavar"],
                help=help_text,
            )
        else:
            serve.add_argument(
                flag,
                dest=field.name,
                type=_flag_value(meta["parse"]),
                default=None,
                metavar=meta["metavar"],
                help=help_text,
            )


def _flag_value(parse: Callable[[str], object]) -> Callable[[str], object]:
    """`parse`, with argparse's error (the flag named) when the text is not a value."""

    def value(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc) or f"invalid value {text!r}") from None

    value.__name__ = getattr(parse, "__name__", "value")
    return value


def _serve(args: argparse.Namespace) -> int:
    from meshtoll.envoyproxy_ratelimit.config_files import load_descriptor_configs
    from meshtoll.server.tls import load_service_tls
    from meshtoll.telemetry.logs import configure_logging
    from meshtoll.telemetry.sampling import sampling_from_environment
    from meshtoll.telemetry.tracing import tracing_protocol

    settings = settings_from(vars(args))
    configure_logging(settings.log_format)
    # Validate before any worker starts: a bad policy is one clear error, not a restart loop;
    # so is a bad OTEL_EXPORTER_OTLP_PROTOCOL or sampling ratio (nothing is exported from here).
    tracing_protocol()
    sampling_from_environment(os.environ)
    load_policy(settings.policy)
    if settings.ratelimit_config is not None:
        load_descriptor_configs(settings.ratelimit_config)
    load_service_tls(settings)
    if settings.admin_tokens_file is not None:
        from meshtoll.server.admin_tokens import load_admin_tokens

        load_admin_tokens(settings.admin_tokens_file)
    if settings.workers == 1:
        from meshtoll.server.app import run
        from meshtoll.server.event_loop import run_on_event_loop

        run_on_event_loop(run(settings), settings.event_loop)
        return 0
    from meshtoll.server.workers import supervise

    return supervise(settings)


def _ratelimit(args: argparse.Namespace) -> int:
    from meshtoll.envoyproxy_ratelimit.environment import rls_settings_from
    from meshtoll.server.event_loop import run_on_event_loop
    from meshtoll.server.rls_app import configure_logging, run

    settings = rls_settings_from()
    configure_logging(settings)
    try:
        run_on_event_loop(run(settings), settings.event_loop)
    except PolicyError as exc:
        print(f"rate-limit configuration rejected:\n{exc}", file=sys.stderr)
        return 1
    return 0
