"""The event store conformance suite: ``contract.EventStoreContract``, run once per backend."""
