"""A retrieval+decode actor: answers questions for any stream it holds a replica of. Replicas
start from a snapshot and apply every update in order, so several actors can serve one stream.
On CPU a replica's retained KV is views of the pages in the node's object store: one copy for
every replica on the node, however many answer actors there are (cache_store/wire.py).

Torch and transformers are imported where they are used (see actors/prefill.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ray

from actors.release import release_freed_memory
from actors.spec import ReplicaGapError, StreamSpec, lookup

if TYPE_CHECKING:
    from cache_store.envelope import Wire
    from pipeline.answerer import Answerer
    from pipeline.sampling import SamplingParams


class _Replica:
    def __init__(self, spec: StreamSpec, memory, answerer: Answerer, applied: int):
        self.spec, self.memory, self.answerer, self.applied = spec, memory, answerer, applied


class AnswerWorker:
    def __init__(self, model_dir: str, device: str = "cpu"):
        from pipeline.model import load_model

        self.model = load_model(model_dir, device=device)
        self.streams: dict[str, _Replica] = {}

    def restore(self, spec: StreamSpec, snapshot: Wire, applied: int) -> None:
        """Hold a replica of the stream as of `applied` updates."""
        from cache_store.wire import unpack_snapshot
        from pipeline.answerer import Answerer

        config = spec.config(self.model.dims)
        memory = unpack_snapshot(snapshot, self.model.dims, config, self.model.device, self.model.dtype)
        self.streams[spec.stream_id] = _Replica(spec, memory, Answerer(self.model, config, spec.system_prompt), applied)

    def apply(self, stream_id: str, first: int, *updates: Wire) -> int:
        """Apply updates numbered from `first` (1-based) in order; idempotent for updates already
        applied. Returns how many the replica holds."""
        from cache_store.wire import unpack_update

        replica = lookup(self.streams, stream_id)
        for sequence, update in enumerate(updates, start=first):
            if sequence <= replica.applied:
                continue
            if sequence != replica.applied + 1:
                raise ReplicaGapError(f"stream {stream_id!r}: have {replica.applied} updates, got number {sequence}")
            try:
                unpacked = unpack_update(update, self.model.device, self.model.dtype)
            except ray.exceptions.ObjectLostError as error:  # its pages' owner (the node) is gone
                raise ReplicaGapError(f"stream {stream_id!r}: update {sequence}'s KV pages are lost ({error})") from error
            replica.memory.apply(unpacked)  # its KV: views of the node's one copy (cache_store/wire.py)
            replica.applied = sequence
        return replica.applied

    def check(self, stream_id: str, question: str, max_new_tokens: int) -> None:
        """Validate a question before the coordinator flushes the stream's open segment for it."""
        lookup(self.streams, stream_id).answerer.check(question, max_new_tokens)

    def ask(self, stream_id: str, question: str, max_new_tokens: int = 64, sampling: SamplingParams | None = None) -> dict:
        from pipeline.sampling import GREEDY

        replica = lookup(self.streams, stream_id)
        answer = replica.answerer.ask(replica.memory, question, max_new_tokens, sampling or GREEDY)
        return {"text": answer.text, "token_ids": answer.token_ids, "evidence": _evidence(answer.evidence),
                "prompt_tokens": answer.prompt_tokens, "applied": replica.applied, "stopped": answer.stopped}

    def ask_stream(self, stream_id: str, question: str, max_new_tokens: int = 64, sampling: SamplingParams | None = None):
        """The answer as it is generated (a Ray streaming generator): first a dict with the
        evidence and prompt size, then the text piece by piece, last a dict with the token ids."""
        from pipeline.sampling import GREEDY

        replica = lookup(self.streams, stream_id)
        generation = replica.answerer.generation(replica.memory, question, max_new_tokens, sampling or GREEDY)
        yield {"evidence": _evidence(generation.evidence), "prompt_tokens": generation.prompt_tokens,
               "applied": replica.applied}
        yield from generation.text_pieces()
        yield {"token_ids": generation.token_ids, "stopped": generation.stopped}

    def snapshot(self, stream_id: str) -> tuple[Wire, int]:
        from cache_store.wire import pack_snapshot

        replica = lookup(self.streams, stream_id)
        return pack_snapshot(replica.memory, stream_id=stream_id, model_id=self.model.name), replica.applied

    def memory(self, stream_id: str) -> dict[str, int]:
        return lookup(self.streams, stream_id).memory.memory()

    def held(self) -> dict[str, int]:
        """Every stream held here, with the updates its replica holds."""
        return {sid: replica.applied for sid, replica in self.streams.items()}

    def close(self, stream_id: str) -> bool:
        closed = self.streams.pop(stream_id, None) is not None
        if closed:
            release_freed_memory()  # its replica's KV: to the OS, not only to malloc (actors/release.py)
        return closed

    def residence(self, stream_id: str) -> dict[str, dict[str, int]]:
        """The replica's KV by tier, in the node's object store or in this process (actors/residence.py)."""
        from actors.residence import residence

        return residence(lookup(self.streams, stream_id).memory)

    def ping(self) -> int:
        return len(self.streams)

    def tables(self) -> dict[str, int]:
        """Sizes of the per-stream state held here (see PrefillWorker.tables)."""
        return {"streams": len(self.streams)}


def _evidence(evidence) -> list[dict]:
    return [{"frames": list(e.frames), "times": list(e.times), "score": e.score, "layers": e.layers} for e in evidence]
