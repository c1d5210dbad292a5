"""End to end over gRPC against a real server on 127.0.0.1:0: commands, validation, the CLI."""
