"""Property-based fuzzing (hypothesis) of the gRPC surface, config files and machine profiles."""
