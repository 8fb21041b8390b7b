"""Run-time tenants in a running meshtoll: every instance keeps the registry's tenants in its
compiled policy (installed), follows the registry's change log (follower), reports what it
has applied (instances), and changes tenants and keys for the admin API and the command line
(service, command)."""
