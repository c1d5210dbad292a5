"""Everything that touches the outside world: gRPC, stores, configuration, the CLI."""
