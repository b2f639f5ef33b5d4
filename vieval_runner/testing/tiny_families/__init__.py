"""Tiny builders of PaliGemma, Florence-2, InternVL, LLaVA and SmolVLM.

Registered into ``vieval_runner.testing.tiny_models``, which stays the one public factory.

Each module exposes ``processor()`` and ``model(processor)``: real transformers classes, tiny
sizes, a byte-level BPE tokenizer trained offline on the factory's corpus.
"""

from __future__ import annotations

from collections.abc import Callable

from vieval_runner.testing.tiny_families import florence2, internvl, llava, paligemma, smolvlm

# family -> (processor factory, model factory taking the processor)
BUILDERS: dict[str, tuple[Callable, Callable]] = {
    "paligemma": (paligemma.processor, paligemma.model),
    "florence2": (florence2.processor, florence2.model),
    "internvl": (internvl.processor, internvl.model),
    "llava": (llava.processor, llava.model),
    "smolvlm": (smolvlm.processor, smolvlm.model),
}
