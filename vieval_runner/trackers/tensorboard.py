"""TensorBoard: event files under ``logging_dir`` written with PyTorch's ``SummaryWriter``
(the writer the Trainer's ``TensorBoardCallback`` uses).

Per step: ``vieval/<metric>`` scalars, one image per sample specimen
(``vieval/sample/<id>``, so the image dashboard's step slider walks it through training), a
text summary of the worst specimens and one of the run metadata. TensorBoard has no update:
a step evaluated again is written again, and its dashboards show the later value.
"""

from __future__ import annotations

from pathlib import Path

from vieval_runner.trackers.payload import LEGEND, PREFIX, StepPayload, metadata_lines


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def worst_markdown(payload: StepPayload) -> str:
    """The worst specimens as a Markdown table (TensorBoard's text plugin renders it)."""
    columns = ["specimen_id", "category", "score", "iou", "prompt", "reference", "prediction"]
    lines = [
        f"Worst {len(payload.worst)} specimens at step {payload.step} "
        f"(score: {payload.score_metric})",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in payload.worst]
    return "\n".join(lines)


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, destination) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.logging_dir = Path(destination.logging_dir)
        self.writer = SummaryWriter(log_dir=str(self.logging_dir))
        self.where = f"{self.logging_dir} (tensorboard --logdir {self.logging_dir.parent})"

    def log_step(self, payload: StepPayload) -> None:
        step = payload.step
        for key, value in payload.scalars.items():
            self.writer.add_scalar(key, value, step)
        for sample in payload.images:
            self.writer.add_image(
                f"{PREFIX}/sample/{sample.specimen_id}", sample.pixels, step, dataformats="HWC"
            )
        self.writer.add_text(f"{PREFIX}/worst_specimens", worst_markdown(payload), step)
        text = "  \n".join([*metadata_lines(payload), f"images: {LEGEND}"])
        self.writer.add_text(f"{PREFIX}/run", text, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
