"""Rate limits as meshtoll decides them: the limiter (one counter-store round trip per
decision at most, refusals remembered, the failure policy, token leases), what a decision's
results mean (verdict), a tenant's limits with their use (quota), and the rate-limit service
Envoy's RLS filter calls, for the policy's domain (service, planned, and rls for gRPC). What
a limit is and how it is counted is counting/'s; envoyproxy/ratelimit's configuration domains
are envoyproxy_ratelimit/'s."""
