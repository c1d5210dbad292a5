"""The error of a call that a stopping process can no longer serve."""

from __future__ import annotations


class ServerStoppingError(Exception):
    """The call needs what this process lost as it stops (a worker's supervisor, which
    grants the turns at SQLite's hot streams): it is answered as a stopping gateway
    answers the calls it refuses, UNAVAILABLE "the server is shutting down", which
    clients retry. No fault of the store's, and none to log: the process says why it
    stops."""
