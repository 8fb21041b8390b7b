"""The ext_proc service: per-route hooks on requests and responses that the policy asks for.

`hooks` is the pure part (what to change, how many units a body says); `service` answers
Envoy's `envoy.service.ext_proc.v3.ExternalProcessor/Process` streams with it.
"""
