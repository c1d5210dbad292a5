"""The gateway's benchmark: ``python -m bench --help``.

gRPC load against the gateway side by side with a bare grpc.aio "floor" server, the
in-process command path side by side with the ``eventsourcing`` library, subscription
catch-up and fan-out, and the performance targets printed as PASS/FAIL. These measure speed;
the tests in ``tests/`` check behaviour and never assert on timing.
"""
