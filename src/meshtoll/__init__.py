"""meshtoll: API-gateway features for an existing Envoy, through Envoy's own extension protocols."""

__version__ = "0.1.0"
