"""Usage delivery to billing systems, the pure core: what a target is called and how a
tenant and a meter are named in it (names), the events each target takes (events), what a
sink promises (batch -> delivery result), how long to wait before trying again (backoff),
and where a sink keeps its checkpoint, lease and quarantine (state)."""
