"""Everything that touches the outside world: gRPC, stores, configuration, the CLI."""

import os

# grpc writes its own log lines to stderr, in a format of its own, outside --log-format
# and --log-level; at its INFO level any client can add one (a failed TLS handshake).
# Only its errors, unless the operator sets GRPC_VERBOSITY. Here, because grpc reads the
# variable once, when it is first imported, and every module of the server imports this
# package before grpc (worker processes inherit the variable).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
