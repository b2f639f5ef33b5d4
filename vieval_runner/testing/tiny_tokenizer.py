"""The tiny byte-level BPE tokenizer every tiny family is built with, trained here offline on
a built-in corpus (test fixtures; the product never imports ``vieval_runner.testing``)."""

from __future__ import annotations

WORDS = (
    "red blue green yellow black white orange purple gray pink "
    "triangle circle square rectangle star box shape object dog cat person car tree "
    "left right top bottom middle center above below next to near far small large big "
    "the a an of in on at and or is are what where which how many color there image picture "
    "find locate detect answer en output its bbox coordinates JSON format label yes no "
    "Locate Find Detect What Where Which How Is Are The A"
)
CORPUS: tuple[str, ...] = (
    WORDS,
    "0 1 2 3 4 5 6 7 8 9 10 11 12 16 20 25 32 48 50 64 75 99 100 128 200 256 300 400 500 "
    "512 600 700 750 768 800 900 999 1000 1023 1024",
    '[{"bbox_2d": [12, 34, 56, 78], "label": "red circle"}]',
    '```json\n[\n  {"bbox_2d": [100, 200, 300, 400], "label": "blue square"}\n]\n```',
    "(100,200),(300,400) (0,0),(999,999) [1, 2, 3, 4] {} [] : ; , . ! ? ' \" - _ / \\ < > = + * # %",
    "Locate the red triangle in the image and output its bbox coordinates in JSON format.",
    "What color is the circle on the left? The circle is blue. How many squares are there? 3",
    "detect red circle ; blue square ; green triangle",
    "answer en what shape is at the top right of the picture",
)

QWEN_SPECIALS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def train_tokenizer(specials: tuple[str, ...], vocab_size: int = 420):
    """A byte-level BPE trained on the built-in corpus; specials get the first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    return tok
