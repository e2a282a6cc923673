"""Process setup shared by every service's `__main__`."""
from __future__ import annotations

import logging
import os


def setup_process(service: str, worker_name: str) -> None:
    """Structured logs with trace ids, tracing (exported only when OTLP is configured), and
    quiet model-loading progress bars."""
    from prism.runtime.telemetry import setup_logging, setup_tracing

    setup_logging(service, os.environ.get("PRISM_LOG_LEVEL", "INFO"))
    setup_tracing(service, instance_id=worker_name)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    logging.captureWarnings(True)


def run_service(config_cls: type, env_prefix: str, service: str, build, prog: str) -> None:
    """The scheduler's whole `__main__`: config from CLI and environment (built once,
    validated), process setup, then serve until SIGTERM drains it."""
    import asyncio

    from prism.runtime.config import config_from_cli
    from prism.runtime.stagework import serve_stage

    config = config_from_cli(config_cls, env_prefix=env_prefix, prog=prog)
    setup_process(service, config.server.worker_name)

    async def main() -> None:
        await serve_stage(config.server, await build(config))

    asyncio.run(main())


def run_worker(specs_from_config, config_cls: type, env_prefix: str, service: str, prog: str) -> None:
    """A worker's whole `__main__` (one stage, or several colocated): config from CLI and
    environment, then a `WorkerHost` serving the stages until SIGTERM drains it."""
    import asyncio
    from pathlib import Path

    from prism.runtime.config import config_from_cli
    from prism.runtime.host import WorkerHost

    config = config_from_cli(config_cls, env_prefix=env_prefix, prog=prog)
    setup_process(service, config.server.worker_name)
    host = WorkerHost(specs_from_config(config), config.server, config.queue,
                      model_name=Path(config.model.model_dir).resolve().name, threads=config.model.threads,
                      variant=config.model.variant)
    asyncio.run(host.serve())
