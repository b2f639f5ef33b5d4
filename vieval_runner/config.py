"""Evaluation config: YAML file + dotted ``key=value`` overrides, validated on load.

Every field has a one-line description (``Field(description=...)``); unknown keys are errors
that name the key and the allowed ones. ``vieval run CONFIG batch_size=16 data.strict=false``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from vieval_runner.config_sections import (
    DataConfig,
    LoraSettings,
    ScoringConfig,
    StrictModel,
    WatchConfig,
)

# report_to name -> the package it needs (the ``trackers`` extra installs all three)
TRACKER_PACKAGES: dict[str, str] = {
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "wandb": "wandb",
}


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


class Config(StrictModel):
    run_dir: str = Field(description="Training output folder holding checkpoint-<step>/ folders.")
    base_model: str = Field(
        description="Base model folder (step 0 and the architecture every checkpoint is swapped into)."
    )
    store: str = Field(
        description="Store root: a local folder or a deltalake URL such as s3://bucket/prefix."
    )
    storage_options: dict[str, str] = Field(
        default_factory=dict,
        description="Object-storage options (AWS_ENDPOINT_URL, AWS_REGION, allow_http ...) for "
        "the store and an s3:// run_dir; keys left out come from the AWS_*/GOOGLE_*/AZURE_* "
        "environment. Secret values are never written.",
    )
    checkpoint_cache_dir: str | None = Field(
        None,
        description="Local folder remote checkpoints are downloaded into (default: "
        "$VIEVAL_CACHE_DIR/checkpoints, else ~/.cache/vieval/checkpoints).",
    )
    checkpoint_cache_gb: float = Field(
        64, gt=0, description="GiB the downloaded remote checkpoints may take at once."
    )
    run_id: str | None = Field(
        None, description="Name of this run in the store (default: the run_dir folder name)."
    )
    task: Literal["grounding", "vqa"] = Field(
        "grounding", description="grounding (phrase -> boxes) or vqa (question -> answer)."
    )
    data: DataConfig = Field(description="The validation split.")
    steps: list[int] | None = Field(
        None, description="Evaluate exactly these steps (0 = base model)."
    )
    every: int | None = Field(
        None, ge=1, description="Evaluate only steps divisible by N (the checkpoint frequency)."
    )
    step_range: tuple[int | None, int | None] | None = Field(
        None, description="Inclusive [first, last] step range."
    )
    include_base: bool = Field(
        True, description="Evaluate step 0 (the base model before training)."
    )
    output_format: str | None = Field(
        None, description="Box output format; default from the model family."
    )
    coords: str | None = Field(
        None, description="Coordinate convention for output_format plain_xyxy."
    )
    prompt_template: str | None = Field(
        None, description="Prompt with {prompt} for the phrase/question; default from the family."
    )
    system_prompt: str | None = Field(
        None, description="System message for chat-template families."
    )
    batch_size: int | Literal["auto"] = Field(
        8,
        description="Specimens per generate call (halved on out-of-memory); 'auto': 512 on "
        "CUDA halved until the longest prompts fit, 8 on CPU.",
    )
    max_new_tokens: int = Field(
        64, ge=1, description="Generation budget per specimen (greedy decoding)."
    )
    device: str = Field(
        "auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU."
    )
    box_scores: bool = Field(
        False,
        description="Score each box by the tokens that wrote it (exp mean log-prob) for AP; "
        "the HF generate fallback keeps every step's scores on the device.",
    )
    force: bool = Field(
        False, description="Re-evaluate steps already stored for the same checkpoint and config."
    )
    preprocess_workers: int = Field(
        default_factory=lambda: max(1, min(8, (os.cpu_count() or 2) - 1)),
        ge=1,
        description="Threads decoding images and running the processor (default: CPUs - 1, at most 8).",
    )
    prepare_cache_ram_mb: float = Field(
        2048, ge=0, description="RAM for prepared processor outputs; beyond it they go to disk."
    )
    cache_dir: str | None = Field(
        None, description="Folder for prepared outputs beyond the RAM budget (default: temp)."
    )
    reuse_prepared: bool = Field(
        True,
        description="Keep processor outputs on local disk and reuse them in later runs on the "
        "same split and processor.",
    )
    prepared_cache_dir: str | None = Field(
        None,
        description="Folder of reusable processor outputs (default: $VIEVAL_CACHE_DIR/prepared, "
        "else $XDG_CACHE_HOME/vieval/prepared, else ~/.cache/vieval/prepared).",
    )
    prepared_cache_max_gb: float = Field(
        4,
        ge=0,
        description="GiB the reusable processor outputs may take (a bigger split is not kept); "
        "least recently used beyond it are removed (0: keep none).",
    )
    prefetch: bool = Field(
        True, description="Read the next checkpoint's weights while the current one generates."
    )
    overlap: bool = Field(
        True,
        description="Parse while the next batch generates and commit while the next step runs.",
    )
    cache_vision: bool = Field(
        True, description="Reuse image embeddings while the vision-tower weights are unchanged."
    )
    vision_cache_ram_mb: float = Field(
        1536, ge=0, description="Host RAM for cached image embeddings (beyond it: recomputed)."
    )
    static_cache: bool = Field(
        False,
        description="Generate with a static KV cache; on CUDA the decoding steps then replay "
        "a CUDA graph (checked once against HF generate with a static cache).",
    )
    cuda_graphs: bool = Field(
        True, description="With static_cache on CUDA: replay decoding steps from CUDA graphs."
    )
    compile: bool = Field(
        False, description="Static KV cache + torch.compile of the decoding step."
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads while generating on the CPU; default: CPUs - 1 with overlap "
        "on (the helper threads need a core), else torch's own.",
    )
    lean_decoding: bool = Field(
        True,
        description="Greedy loop without HF generate's per-step overhead where it is exact "
        "(checked against generate on the first batch); else HF generate.",
    )
    thumb_px: int = Field(
        768, ge=32, description="Longest side of the image copy embedded in the store."
    )
    scoring: ScoringConfig = Field(
        default_factory=ScoringConfig, description="Thresholds for metrics and failure categories."
    )
    watch: WatchConfig = Field(default_factory=WatchConfig, description="Watch-mode timing.")
    lora: LoraSettings = Field(
        default_factory=LoraSettings, description="Checks on LoRA adapter checkpoints."
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Also log each committed step to these trackers (the Trainer's key; "
        "'none' or 'all' as in the Trainer); needs pip install 'vieval-runner[trackers]'.",
    )
    logging_dir: str | None = Field(
        None,
        description="TensorBoard folder (the Trainer's key); default: 'tensorboard' beside the "
        "store; inside VievalCallback, the Trainer's own.",
    )
    report_sample: int = Field(
        16,
        ge=0,
        description="Specimens logged as images with reference and predicted boxes at every "
        "step (the same ids each step).",
    )

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_ok(cls, value: Any) -> int | str:
        # before the union's own checks, so an error names 'batch_size', not a union branch
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError("must be an integer >= 1 or 'auto'")
        return value

    @field_validator("steps")
    @classmethod
    def _steps_some(cls, value: list[int] | None) -> list[int] | None:
        if value == []:
            raise ValueError("an empty list selects nothing; leave 'steps' out to take every step")
        return value

    @field_validator("step_range")
    @classmethod
    def _range_ordered(cls, value):
        if value is not None and None not in value and value[0] > value[1]:
            raise ValueError(f"first step {value[0]} is after last step {value[1]}")
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value: Any) -> Any:
        # the Trainer's spellings: one name, "none", "all", or a list of names
        if value is None or value == "none" or value == ["none"]:
            return []
        if value == "all" or value == ["all"]:
            return list(TRACKER_PACKAGES)
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, value: list[str]) -> list[str]:
        import importlib.util

        for name in value:
            package = TRACKER_PACKAGES[name]
            if importlib.util.find_spec(package) is None:
                raise ValueError(
                    f"{name!r} needs the {package} package, which is not installed: "
                    "pip install 'vieval-runner[trackers]'"
                )
        return list(dict.fromkeys(value))  # each tracker once

    @field_validator("storage_options", mode="before")
    @classmethod
    def _options_are_text(cls, value: Any) -> Any:
        # YAML reads `allow_http: true` as a bool; the object-store clients want strings
        if isinstance(value, dict):
            return {
                str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()
            }
        return value

    @field_validator("device")
    @classmethod
    def _device_ok(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda", "mps") or (
            value.startswith("cuda:") and value[5:].isdigit()
        ):
            return value
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")

    @field_validator("output_format")
    @classmethod
    def _format_known(cls, value: str | None) -> str | None:
        from vieval_runner.parsing import FORMATS  # pure Python, cheap

        if value is not None and value not in FORMATS:
            raise ValueError(
                f"unknown output format {value!r}; allowed: {', '.join(sorted(FORMATS))}"
            )
        return value

    @field_validator("coords")
    @classmethod
    def _coords_known(cls, value: str | None) -> str | None:
        from vieval_runner.parsing import COORDS

        if value is not None and value not in COORDS:
            raise ValueError(f"unknown coords {value!r}; allowed: {', '.join(sorted(COORDS))}")
        return value

    @model_validator(mode="after")
    def _selection_ok(self) -> Config:
        if self.steps is not None and (self.every is not None or self.step_range is not None):
            raise ValueError("give either 'steps' or 'every'/'step_range', not both")
        return self

    @property
    def effective_run_id(self) -> str:
        return self.run_id or Path(self.run_dir.rstrip("/")).name or "run"


def _field_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    return [prefix + name for name in model.model_fields]


def _describe(error: dict, source: str) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        parent: type[BaseModel] = Config
        for part in error["loc"][:-1]:
            annotation = parent.model_fields[str(part)].annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                parent = annotation
        allowed = ", ".join(parent.model_fields)
        return f"{source}: unknown key '{loc}' (allowed here: {allowed})"
    if kind == "missing":
        return f"{source}: missing required key '{loc}'"
    if not loc:  # a rule across keys: its message names them
        return f"{source}: {error['msg'].removeprefix('Value error, ')}"
    if kind == "literal_error":
        return f"{source}: '{loc}' {error['msg'].lower()} (got {error.get('input')!r})"
    if loc.startswith("storage_options"):  # never echo what may hold a secret
        return f"{source}: '{loc}': {error['msg']} (expected a mapping of KEY: value)"
    return f"{source}: '{loc}': {error['msg']} (got {error.get('input')!r})"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", "steps=[0,100]"]`` -> ``[("a.b", 1), ("steps", [0, 100])]`` (YAML values)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        parsed.append((key.strip(), value))
    return parsed


def config_from_dict(tree: dict, source: str = "config") -> Config:
    """Validate a plain dict; errors name ``source`` and the offending key."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(e, source) for e in exc.errors())) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply dotted overrides, validate.

    Relative ``run_dir``, ``base_model``, ``store``, ``data.path`` and ``data.images_root`` are
    resolved against the config file's folder, so a config travels with its data.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(tree).__name__}")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    _resolve_paths(tree, path.parent)
    return config_from_dict(tree, str(path))


def _resolve_paths(tree: dict, base: Path) -> None:
    def resolve(value: Any, *, must_be_local: bool) -> Any:
        if not isinstance(value, str) or not value or "://" in value:
            return value
        candidate = Path(value).expanduser()
        if candidate.is_absolute():
            return str(candidate)
        local = (base / candidate).resolve()
        # A hub-style base model name ("org/model") that is no local folder stays as given.
        return str(local) if must_be_local or local.exists() else value

    for key, must_be_local in (
        ("run_dir", True),
        ("store", True),
        ("base_model", False),
        ("logging_dir", True),
        ("checkpoint_cache_dir", True),
    ):
        if key in tree:
            tree[key] = resolve(tree[key], must_be_local=must_be_local)
    data = tree.get("data")
    if isinstance(data, dict):
        for key in ("path", "images_root"):
            if key in data:
                data[key] = resolve(data[key], must_be_local=True)


def redacted(config: Config) -> dict:
    """The config as plain data with secret storage options replaced by ``"***"``."""
    from vieval_runner.objectstore import redact_options

    tree = config.model_dump(mode="json")
    tree["storage_options"] = redact_options(config.storage_options)
    return tree


def dump_config(config: Config) -> dict:
    """The validated config as plain data, secrets redacted (stored with each evaluation
    and logged: credentials never reach the store or the log)."""
    return redacted(config)
