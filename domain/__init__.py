"""The pure write model: commands, events, aggregates, handlers, the command bus and its ports.

Nothing here imports grpc, protobuf or a database driver.
"""
