"""The server's settings (:class:`ServerConfig`), built once from the command line (``flags``) or by a
program embedding the server, and how many KV-cache blocks they ask for (:meth:`ServerConfig.kv_blocks`)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ..errors import UsageError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_API_PATH = "/rllama/v1/inference"
DEFAULT_MAX_CONCURRENT = 5
DEFAULT_PROMPT_CACHE_SIZE = 50
DEFAULT_PROMPT_CACHE_MEMORY_MIB = 2048
DEFAULT_MAX_QUEUE = 32
API_KEY_ENV = "SHARDLLAMA_API_KEY"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # 0: any free port
    api_path: str = DEFAULT_API_PATH
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    max_queue: int = DEFAULT_MAX_QUEUE
    prompt_cache_size: int = DEFAULT_PROMPT_CACHE_SIZE  # entries
    prompt_cache_memory_mib: int = DEFAULT_PROMPT_CACHE_MEMORY_MIB
    prompt_cache_dir: str | None = None
    exit_after_one_query: bool = False
    allowed_hosts: Sequence[str] = ()
    cors_origins: Sequence[str] = ()
    api_key: str | None = None
    idle_timeout: float | None = None  # None: app.IDLE_TIMEOUT_S
    quiet: bool = False

    def __post_init__(self) -> None:
        if not self.api_path.startswith("/"):
            raise UsageError(f"--inference-server-api-path must start with '/', got {self.api_path!r}")
        if self.api_path in ("/health", "/metrics"):
            raise UsageError(f"--inference-server-api-path {self.api_path!r} is taken by another route")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--inference-server-port must be in 0..65535, got {self.port}")
        if self.max_concurrent < 1:
            raise UsageError(f"--inference-server-max-concurrent-inferences must be >= 1, got {self.max_concurrent}")
        if self.idle_timeout is not None and not self.idle_timeout > 0:
            raise UsageError(f"idle_timeout must be > 0 seconds, got {self.idle_timeout}")
        self.access()  # a bad value fails now, before a model is opened

    def access(self):
        """The access rules of :mod:`.access` these settings make."""
        from .access import Access

        return Access.build(self.host, allowed_hosts=self.allowed_hosts, api_key=self.api_key,
                            cors_origins=self.cors_origins)

    def kv_blocks(self, max_seq_len: int, bytes_per_token: int, block_size: int) -> int:
        """KV-cache blocks to open the model with: what ``max_concurrent`` sequences of ``max_seq_len`` may
        need, plus what the prompt cache may hold: ``prompt_cache_size`` full contexts, at most
        ``prompt_cache_memory_mib``.  Memory is taken as blocks fill (``kv_cache.KVCache``), so this bounds it."""
        per_seq = -(-max_seq_len // block_size)
        cache = 0
        if self.prompt_cache_size > 0:
            fit = (self.prompt_cache_memory_mib << 20) // max(1, bytes_per_token * block_size)
            cache = min(self.prompt_cache_size * per_seq, fit)
        return self.max_concurrent * per_seq + cache
