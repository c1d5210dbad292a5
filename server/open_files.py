"""The open-file limit of a serving process: raised from its soft to its hard limit.

Every client connection is a file descriptor, besides the store's files and grpc's own.
Many hosts start services with a soft limit of 1,024 open files (and a hard limit far
above): a gateway left at it stops accepting connections at about a thousand clients,
grpc logging "File descriptor limit reached. Retrying." once a second while the clients
wait to connect. The soft limit is only a default that a process may raise up to the
hard one, as Go's runtime does for every program, so ``serve`` takes what it may.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("order_gateway.server")


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (its children, the
    workers of ``--workers``, inherit it); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        # Unlimited is not a value the soft limit may take on every system.
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as error:
        log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, error)
        return soft
    return hard
