"""Transports that know nothing of meshtoll's decisions: a bounded HTTP/1.1 listener
(http_listener) and the request/response layer the HTTP authz, JSON and admin endpoints
share (http_server)."""
