"""Running meshtoll: settings wired into services (services: `build`) and served on their
ports (app, listeners, tls), the admin API (admin, admin_access), background work and
shutdown (lifecycle), worker processes (workers), `meshtoll ratelimit` built the same way
(rls_services: `build_rls`) and served (rls_app), and both commands' flags (command)."""
