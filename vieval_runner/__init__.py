"""vieval-runner: evaluate every checkpoint of a fine-tuned vision-language model."""

__version__ = "0.1.0"
