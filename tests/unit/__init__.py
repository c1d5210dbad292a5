"""Domain and mapping tests with in-memory fakes: no server, no database."""
