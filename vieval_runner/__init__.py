"""vieval-runner: evaluate every checkpoint of a fine-tuned vision-language model."""

from vieval_runner.version import __version__

__all__ = ["VievalCallback", "__version__"]


def __getattr__(name: str):
    # Lazy: importing the package must stay cheap (`vieval parse` imports no model library).
    if name == "VievalCallback":
        from vieval_runner.pipeline.callback import VievalCallback

        return VievalCallback
    raise AttributeError(f"module 'vieval_runner' has no attribute {name!r}")
