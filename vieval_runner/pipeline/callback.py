"""`VievalCallback`: evaluate on every checkpoint save from inside a `transformers.Trainer`.

Two modes:

- ``"in_process"`` (default): the live training model generates for the split right after
  the save (no second copy of the weights). The model is switched to eval mode under
  ``torch.no_grad`` and back to train mode afterwards; the step is committed to the store
  like any `vieval run` step, so the viewer shows it live.
- ``"subprocess"``: launches ``vieval run CONFIG steps=[STEP]`` in the background (e.g. with
  ``device=cuda:1``), so evaluation runs on another device while training goes on. The
  launched runs go one at a time, in step order; ``on_train_end`` waits for the last.

    from vieval_runner import VievalCallback
    trainer = Trainer(..., callbacks=[VievalCallback("eval.yaml")])
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rich.console import Console
from transformers import TrainerCallback

from vieval_runner import checkpoints as ckpts
from vieval_runner.config import Config, load_config
from vieval_runner.pipeline import tracking
from vieval_runner.records import LoadedModel


class VievalCallback(TrainerCallback):
    """Evaluate each saved checkpoint with vieval (see the module docstring)."""

    def __init__(
        self,
        config: str | Path | Config,
        overrides: list[str] | tuple[str, ...] = (),
        mode: str = "in_process",
        device: str | None = None,
        evaluate_base: bool = False,
    ):
        if mode not in ("in_process", "subprocess"):
            raise ValueError(f"mode must be 'in_process' or 'subprocess', got {mode!r}")
        self.config_path = None if isinstance(config, Config) else Path(config)
        self.overrides = list(overrides) + ([f"device={device}"] if device else [])
        self.config = config if isinstance(config, Config) else load_config(config, self.overrides)
        self.mode = mode
        self.evaluate_base = evaluate_base
        self.console = Console(stderr=True)
        self._session = None
        self._queue: list[int] = []
        self._running: subprocess.Popen | None = None
        self.evaluated: list[int] = []

    # -- in process -----------------------------------------------------------------------
    def _session_for(self, model, processor):
        from vieval_runner.model import loading as models
        from vieval_runner.pipeline.session import attach_model, open_session

        if self._session is None:
            self._session = open_session(self.config, self.console)
            self._session.open_ended = True  # more saves come while training runs
            unwrapped = getattr(model, "module", model)  # DDP/accelerate wrappers
            if processor is None or not hasattr(processor, "image_processor"):
                from transformers import AutoProcessor

                processor = AutoProcessor.from_pretrained(self.config.base_model)
            family = models.family_for_model_type(
                unwrapped.config.model_type, "training model config"
            )
            parameter = next(unwrapped.parameters())
            live = LoadedModel(
                model=unwrapped,
                processor=processor,
                family=family,
                device=parameter.device,
                dtype=parameter.dtype,
                base_model=self.config.base_model,
                current="live training model",
            )
            attach_model(self._session, live)
        return self._session

    def _evaluate_live(self, args, state, model, processor) -> None:
        import torch

        from vieval_runner.pipeline.run import evaluate_resident

        session = self._session_for(model, processor)
        tracking.attach_trainer(session, args)  # report_to: into the Trainer's own runs
        step = int(state.global_step)
        path = Path(args.output_dir) / f"checkpoint-{step}"
        ckpt = ckpts.Checkpoint(step, path, "full", True, "")
        digest = ckpts.checkpoint_hash(path) if path.is_dir() else f"live:{step}"
        live = session.loaded.model
        was_training = live.training
        live.eval()
        try:
            with torch.no_grad():
                evaluate_resident(session, ckpt, digest, advance=None)
        finally:
            live.train(was_training)
        self.evaluated.append(step)
        self.console.print(f"vieval: step {step} evaluated in process -> {self.config.store}")

    # -- subprocess ----------------------------------------------------------------------
    def _launch_next(self) -> None:
        if self._running is not None and self._running.poll() is None:
            return
        if self._running is not None:
            self._running = None
        if not self._queue:
            return
        step = self._queue.pop(0)
        if self.config_path is None:
            raise ValueError("subprocess mode needs a config file path, not a Config object")
        command = [
            sys.executable,
            "-m",
            "vieval_runner",
            "run",
            str(self.config_path),
            *self.overrides,
        ]
        command.append(f"steps=[{step}]")
        from vieval_runner.pipeline.ranks import single_process_env

        # the training job's RANK/WORLD_SIZE must not make the child join its process group
        self._running = subprocess.Popen(command, env=single_process_env())
        self.evaluated.append(step)
        self.console.print(f"vieval: launched evaluation of step {step} (pid {self._running.pid})")

    # -- Trainer hooks -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.evaluate_base and state.is_world_process_zero and self.mode == "subprocess":
            self._queue.append(0)
            self._launch_next()

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.mode == "in_process":
            self._evaluate_live(args, state, model, processing_class)
        else:
            self._queue.append(int(state.global_step))
            self._launch_next()

    def on_step_end(self, args, state, control, **kwargs):
        if self.mode == "subprocess":
            self._launch_next()

    def on_train_end(self, args, state, control, **kwargs):
        if self.mode != "subprocess":
            if self._session is not None:
                tracking.close(self._session)  # every step logged; the Trainer's runs stay open
            return
        while self._queue or (self._running is not None and self._running.poll() is None):
            if self._running is not None:
                self._running.wait()
            self._launch_next()
