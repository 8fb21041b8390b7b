"""Authz: who is calling and may they make this request (Envoy ext_authz, gRPC and HTTP)."""
