"""Event store backends, one module each, chosen by URL in ``server.stores.factory``."""
