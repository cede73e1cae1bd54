"""Runners: one module per model family, each behind the small :class:`~runners.base.Runner` API.

``load_runner(tag)`` opens a stored model, verifies its checksums and returns the runner of the
family recorded in its metadata, loaded and warmed up.
"""

from runners.base import BatchResult, Runner, load_runner, runner_class

__all__ = ["BatchResult", "Runner", "load_runner", "runner_class"]
