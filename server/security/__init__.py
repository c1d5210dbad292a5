"""Who may call what: authentication (static tokens, JWTs), scopes, identity and TLS."""
