"""How the answer's next token is chosen: greedy (the default, exact), or sampled with temperature
and nucleus (top_p) from a seeded generator, and stop strings that end the answer.

Sampling follows OpenAI's and vLLM's semantics: temperature 0 is greedy; otherwise the logits are
divided by the temperature, the smallest set of tokens whose probabilities reach top_p is kept
(the most likely token always is), and the token is drawn from a `torch.Generator` seeded with
`seed`, so a seeded answer is the same every time (and a streamed answer resumed on another
replica continues the same text). The stop strings are not part of the answer.

torch is imported where tokens are chosen, not with the module: `SamplingParams` travels from the
HTTP replica through the coordinator, whose process must stay torch-free (unpickling it imports
this module; with torch at the top that cost the coordinator ~270 MB for good, BENCHMARKS.md
"Stream churn").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import InvalidInputError

if TYPE_CHECKING:
    import torch

MAX_STOP = 4  # as OpenAI's API
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None with temperature > 0: the caller picks one (an answer must be resumable)
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidInputError(f"temperature must be in [0, 2], not {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInputError(f"top_p must be in (0, 1], not {self.top_p}")
        if len(self.stop) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise InvalidInputError(f"stop: at most {MAX_STOP} non-empty strings of up to {MAX_STOP_CHARS} characters")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams()


class TokenSampler:
    """Chooses tokens for one answer: `sampler(logits [vocab] fp32) -> token id`."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        import torch

        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else 0)

    def __call__(self, logits: torch.Tensor) -> int:
        import torch

        if self.params.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.params.temperature, dim=-1)  # [vocab]
        if self.params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
            sorted_probs[before >= self.params.top_p] = 0.0  # the first token always stays
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def held_back(stop: tuple[str, ...]) -> int:
    """Characters a streamed answer holds back: the end of the text might begin a stop string."""
    return max((len(s) - 1 for s in stop), default=0)
