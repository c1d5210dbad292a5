"""``serve --workers N``: several serving processes on one listen address, supervised."""
