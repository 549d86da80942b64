"""DecoderActor: a StreamDecoder (actors/decoder.py) as a Ray actor, one stream per process.
Usage: actors/decoder.py.

Threads. Decoding runs in a background thread of the actor (`pipeline.decode.open_source`). The
actor is a threaded actor with concurrency groups, so control calls never queue behind work:
the default group (start, status, stop; 4 threads), "push" (push, close; 2 threads) and "wait"
(wait; 8 threads). A blocked `push` (buffer full) or a long `wait` does not delay `status`.

Restarts. `DecoderActor` has `max_restarts=0`: a restarted decoder would start its source over
and re-send frames. The owner (stream coordinator) decides whether to start a new one.
"""

from __future__ import annotations

import ray

from actors.decoder import StreamDecoder

__all__ = ["DecoderActor"]

DecoderActor = ray.remote(
    num_cpus=0.05,
    max_restarts=0,
    max_concurrency=4,  # default group: start, status, stop
    concurrency_groups={"push": 2, "wait": 8},
)(StreamDecoder)
