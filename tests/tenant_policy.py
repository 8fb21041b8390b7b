"""The policy the run-time tenant tests run on: two plans, and one file tenant whose key and
name a run-time tenant must not take."""

from __future__ import annotations

import hashlib

FILE_KEY = "file-acme-key"
POLICY = f"""
plans:
  free: {{limits: [{{requests: 10, per: minute}}]}}
  pro: {{limits: [{{requests: 1000, per: minute}}]}}
tenants:
  acme: {{plan: pro, api_keys: [{{id: acme-ci, sha256: {hashlib.sha256(FILE_KEY.encode()).hexdigest()}}}]}}
routes: [{{prefix: /v1/, name: v1}}]
"""
