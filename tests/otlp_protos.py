"""Which of opentelemetry-proto's files an environment holds in another package's version:
xds-protos writes an older copy of the same OTLP modules (scripts/otlp-protos)."""

from __future__ import annotations

import subprocess

# Run by the environment's own Python: its installed files against the hashes its installer
# recorded for opentelemetry-proto.
_CHECK = """
import base64, hashlib, importlib.metadata
for file in importlib.metadata.distribution("opentelemetry-proto").files or ():
    if file.hash is not None and file.hash.mode == "sha256":
        digest = hashlib.sha256(file.locate().read_bytes()).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != file.hash.value:
            print(file)
"""


def overwritten_otlp_files(python: str) -> list[str]:
    found = subprocess.run([python, "-c", _CHECK], capture_output=True, text=True, check=True)
    return found.stdout.split()
