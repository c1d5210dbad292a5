"""Subscribe: catch-up, live delivery, filters, lifecycle, on every backend."""
