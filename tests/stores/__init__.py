"""Backend-specific store behaviour (the contract every backend shares is in
tests/conformance): batches, PostgreSQL specifics, crash recovery."""
