"""How a generation runs (everything but the inputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vieval_runner.generate.embedding_cache import VisionCache


@dataclass
class GenerateOptions:
    """How ``generate`` runs (everything but the inputs); defaults = plain greedy decoding."""

    static_cache: bool = False  # a static KV cache (no torch.compile)
    cuda_graphs: bool = True  # with static_cache on CUDA: decoding steps replay a CUDA graph
    compile: bool = False  # static cache + torch.compile of the decoding forward
    vision_cache: VisionCache | None = None  # image embeddings by specimen (frozen towers)
    overlap: bool = True  # collate ahead and decode behind on helper threads
    scores: bool = False  # token log-probabilities -> GeneratedText.confidence (box scores)
    lean: bool = True  # the lean greedy loop where it is exact (else HF generate)
