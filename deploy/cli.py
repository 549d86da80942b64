"""The `streamkv` command line.

    streamkv demo [--method streamkv] [--frames 600]
    streamkv serve [--config deploy/serve.yaml]
    streamkv ingest sources.yaml [--model DIR] [--address auto] [--no-wait]
    streamkv ask STREAM "question" [--address auto]
    streamkv status [STREAM] [--address auto]
    streamkv bench engine|qa|pipeline|gpu [-- options of that benchmark]
"""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(help="Question answering over live video streams.", no_args_is_help=True)
console = Console()


def _connect(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, namespace="streamkv", log_to_driver=False, include_dashboard=False)


@app.command()
def demo(method: str = "streamkv", frames: int = 600, questions: int = 16, seed: int = 90001) -> None:
    """Stream a generated video through the engine with the shipped model and ask questions."""
    from synthetic.demo import main

    main(["--method", method, "--frames", str(frames), "--questions", str(questions), "--seed", str(seed)])


@app.command()
def serve(config: str = "deploy/serve.yaml") -> None:
    """Start the HTTP API (Ray Serve) from a Serve config, in the foreground."""
    import subprocess
    import sys
    from pathlib import Path

    serve_bin = Path(sys.executable).with_name("serve")
    raise typer.Exit(subprocess.call([str(serve_bin), "run", config]))


@app.command()
def ingest(sources: str, model: Optional[str] = None, address: Optional[str] = None, index_url: Optional[str] = None,
           wait: bool = True, cluster: bool = False) -> None:
    """Ingest the cameras listed in SOURCES (YAML) into the named coordinator, with progress.
    --cluster places actors on ray_cluster.yaml's node types (GPU workers, decoder nodes)."""
    import ray

    from deploy.ingest import CLUSTER_PLACEMENT, coordinator, read_sources, run_ingest

    model_dir, listed = read_sources(sources)
    _connect(address)
    placement = {"placement": CLUSTER_PLACEMENT, "device": "cuda"} if cluster else {}
    handle = coordinator(model or model_dir, index_url=index_url, **placement)
    statuses = run_ingest(handle, listed, wait=wait)
    console.print_json(json.dumps(statuses))
    if address is None and wait:
        ray.shutdown()


@app.command()
def ask(stream: str, question: str, max_tokens: int = 64, address: str = "auto") -> None:
    """Ask a question about a stream of the running coordinator."""
    import ray

    from deploy.ingest import coordinator

    _connect(address)
    answer = ray.get(coordinator().ask.remote(stream, question, max_tokens))
    console.print(answer["text"])
    console.print_json(json.dumps(answer["evidence"]))


@app.command()
def status(stream: Optional[str] = None, address: str = "auto") -> None:
    """Status of one stream, or of all streams, of the running coordinator."""
    import ray

    from deploy.ingest import coordinator

    _connect(address)
    handle = coordinator()
    streams = [stream] if stream else ray.get(handle.list_streams.remote())
    console.print_json(json.dumps({s: ray.get(handle.status.remote(s)) for s in streams}))


@app.command()
def stop(address: str = "auto") -> None:
    """End the running coordinator with its model actors and every stream."""
    from deploy.ingest import stop_coordinator

    _connect(address)
    console.print(f"stopped; {stop_coordinator()} streams dropped")


BENCHMARKS = ("engine", "qa", "pipeline", "restart", "first_frame", "load", "gpu")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context, which: str = typer.Argument(..., help=" | ".join(BENCHMARKS))) -> None:
    """Run a benchmark; extra options go to it (see `python -m bench.<which> --help`)."""
    import importlib

    if which not in BENCHMARKS:
        raise typer.BadParameter(f"choose one of {', '.join(BENCHMARKS)}")
    importlib.import_module(f"bench.{which}").main(ctx.args)


if __name__ == "__main__":
    app()
