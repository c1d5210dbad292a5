"""Authentication, scopes, identity, TLS and limits, against a real server."""
