"""The filters, logger and connection-manager settings of the local stack's Envoy
(envoy/local.yaml, exercised end to end by the tests), as data to deploy elsewhere."""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any

import yaml

from meshtoll.local.envoy_config import HIDDEN_QUERY_KEY_FILTER, EnvoyPorts, render_bootstrap

# Any ports: only the filters' configuration is read, never an address.
_PORTS = EnvoyPorts(*range(20000, 20000 + len(fields(EnvoyPorts))))


@dataclass(frozen=True, slots=True)
class LocalFilters:
    bootstrap: dict[str, Any]

    @classmethod
    def load(cls, api_key_query_param: str | None = None) -> LocalFilters:
        """With `api_key_query_param`, the filter removing it follows each HTTP ext_authz."""
        return cls(yaml.safe_load(render_bootstrap(_PORTS, api_key_query_param=api_key_query_param)))

    def hidden_query_key(self) -> dict[str, Any] | None:
        """The filter that removes the query-parameter key after HTTP ext_authz, if any."""
        filters = self.connection_manager("full")["http_filters"]
        return next((item for item in filters if item["name"] == HIDDEN_QUERY_KEY_FILTER), None)

    def listener(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = next(
            item for item in self.bootstrap["static_resources"]["listeners"] if item["name"] == name
        )
        return copy.deepcopy(found)

    def connection_manager(self, listener: str = "full") -> dict[str, Any]:
        manager: dict[str, Any] = self.listener(listener)["filter_chains"][0]["filters"][0]["typed_config"]
        return manager

    def http_filter(self, listener: str, name: str) -> dict[str, Any]:
        found: dict[str, Any] = next(
            item for item in self.connection_manager(listener)["http_filters"] if item["name"] == name
        )
        return found

    def http_authz(self) -> dict[str, Any]:
        config: dict[str, Any] = self.http_filter("http_authz", "envoy.filters.http.ext_authz")[
            "typed_config"
        ]
        return config

    def grpc_authz(self) -> dict[str, Any]:
        config: dict[str, Any] = self.http_filter("grpc_authz", "envoy.filters.http.ext_authz")[
            "typed_config"
        ]
        return config

    def hooks(self) -> list[dict[str, Any]]:
        return [
            item
            for item in self.connection_manager("full")["http_filters"]
            if item["name"] == "meshtoll.hooks"
        ]

    def ratelimit(self) -> dict[str, Any]:
        return self.http_filter("rls", "envoy.filters.http.ratelimit")

    def meter(self, listener: str = "full") -> dict[str, Any]:
        """The access logger's configuration: OpenTelemetry on `full`, the gRPC access log
        service (http_grpc) on `full_als`."""
        (logger,) = self.connection_manager(listener)["access_log"]
        config: dict[str, Any] = logger["typed_config"]
        return config

    def cluster(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = next(
            item for item in self.bootstrap["static_resources"]["clusters"] if item["name"] == name
        )
        return copy.deepcopy(found)


def with_grpc_cluster(config: Any, cluster: str) -> Any:
    """`config` with every `envoy_grpc.cluster_name` pointed at `cluster`."""
    if isinstance(config, dict):
        return {
            key: {**value, "cluster_name": cluster}
            if key == "envoy_grpc"
            else with_grpc_cluster(value, cluster)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [with_grpc_cluster(item, cluster) for item in config]
    return config
