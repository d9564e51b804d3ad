"""airlock: an S3-compatible object store whose every write is synchronously
replicated into an independent vault.  See docs/architecture.md."""

__version__ = "0.1.0"
