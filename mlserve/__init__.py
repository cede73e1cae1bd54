"""mlserve: shared code for training and serving (settings, store access, schemas, CLI)."""

__version__ = "0.1.0"
