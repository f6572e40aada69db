"""The worker-process side of shardllama: map (or load) one shard, run its slice of every layer, reply.

``python -m workers --connect ENDPOINT [--model-path PATH]``; the CLI's ``shardllama worker`` calls
:func:`main` (argv) or :func:`run_worker` (keyword arguments).
"""

from .worker import main, run_worker

__all__ = ["main", "run_worker"]
