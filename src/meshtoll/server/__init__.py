"""Running meshtoll: settings into services (app), ports (listeners, tls), the admin API
(admin, admin_access), background work and shutdown (lifecycle), worker processes
(workers), and `meshtoll ratelimit` (rls_app)."""
