"""Tiny builders of the encoder-decoder and LLaVA-style families (Florence-2, InternVL, LLaVA,
SmolVLM), registered into ``vieval_runner.tiny_models``, which stays the one public factory.

Each module exposes ``processor()`` and ``model(processor)``: real transformers classes, tiny
sizes, a byte-level BPE tokenizer trained offline on the factory's corpus.
"""

from __future__ import annotations

from collections.abc import Callable

from . import florence2, internvl, llava, smolvlm

# family -> (processor factory, model factory taking the processor)
BUILDERS: dict[str, tuple[Callable, Callable]] = {
    "florence2": (florence2.processor, florence2.model),
    "internvl": (internvl.processor, internvl.model),
    "llava": (llava.processor, llava.model),
    "smolvlm": (smolvlm.processor, smolvlm.model),
}
