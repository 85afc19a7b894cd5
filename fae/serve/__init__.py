"""`fae serve`: try a generation pipeline in the browser (docs/serve.md).

    service = SampleService(GenerationPipeline.from_pretrained("runs/demo/pipeline"), "runs/demo/pipeline").start()
    server = SampleServer(service, "127.0.0.1", 8765)
    server.serve_forever()

Standard library only (http.server + one worker thread + one static page): nothing to install beyond fae. A request
is checked up front (fae.serve.jobs.parse_request: the generator's classes or prompts, samplers, limits and the work
budget) and sampled by fae.sampling.generate exactly as `fae sample --pipeline` samples it.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from fae.serve.jobs import Job, SampleRequest, SampleService, ServeLimits, network_evaluations, parse_request
from fae.serve.server import SampleServer, is_loopback

__all__ = ["Job", "SampleRequest", "SampleServer", "SampleService", "ServeLimits", "is_loopback",
           "network_evaluations", "parse_request", "serve"]


def serve(pipeline: str | Path, host: str = "127.0.0.1", port: int = 8765, limits: ServeLimits | None = None,
          device: str = "cpu", precision: str = "auto", compile: str = "auto", verbose: bool = False,
          ready: Callable[[SampleServer], None] | None = None) -> None:
    """Load the pipeline folder and serve its page until interrupted (Ctrl-C). A host other than a loopback address
    makes the page reachable by others: a warning says so. `ready(server)` is called once it listens."""
    from fae.pipeline import GenerationPipeline

    pipe = GenerationPipeline.from_pretrained(pipeline, device=device)
    service = SampleService(pipe, pipeline, limits, precision=precision, compile=compile).start()
    server = SampleServer(service, host, port, verbose=verbose)
    if not is_loopback(host):
        print(f"warning: serving on {host}: anyone who can reach this machine on port {server.server_address[1]} "
              "can use this page and its CPU (no authentication); use the default 127.0.0.1 unless you mean it",
              file=sys.stderr)
    print(f"fae serve: {pipeline} at {server.url} (Ctrl-C stops)", flush=True)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.stop()
