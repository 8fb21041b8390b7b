"""Telemetry: counters kept cheaply on the hot path, published through OpenTelemetry."""
