"""Where does SmolVLM's batched forward on CUDA leave the single-specimen one? Stage by stage.

`scripts/gpu_diag_batching.py` found SmolVLM/Idefics3 not batch-invariant on an H200 (fp32:
last-token logits of one specimen alone vs inside a batch of 8 differ by up to 6.9; 1.6e-6 on
the CPU; Qwen2-VL equal on both). This prints, for the specimen with the shortest prompt
(most left padding) alone vs last in a batch of 8, the max difference of

  vision     its image features (vision tower + connector) from get_image_features
  merged     its input embeddings after the image features are merged in (valid positions)
  text       the text model's last-token logits fed the SAME merged embeddings (isolates the
             text model: padding, masks, SDPA)
  full       the whole forward's last-token logits, with SDPA's default backends, with the
             math backend only, and with eager attention

so one run on a lent GPU says which stage to fix. Run from the repo root (CPU works too):

    DEV=cuda python3 scripts/gpu_diag_smolvlm.py
"""

import os
import sys
import tempfile

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vieval_runner.generate.batches import collate
from vieval_runner.generate.decoding import to_device
from vieval_runner.model.loading import load_base
from vieval_runner.model.swap import swap_weights
from vieval_runner.prepare.inputs import prepare
from vieval_runner.testing.tiny_models import write_tiny_run

sys.path.insert(0, "tests")
from conftest import make_specimens  # noqa: E402  (the tests' mixed-size specimens)

DEV = os.environ.get("DEV", "cuda")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def main() -> None:
    run = write_tiny_run(tempfile.mkdtemp(), "smolvlm")
    loaded = load_base(run.base_model_dir, device=DEV, dtype="fp32")
    swap_weights(loaded, run.run_dir / "checkpoint-200")
    inner = loaded.model.model
    prepared = prepare(loaded, make_specimens())
    order = sorted(range(len(prepared)), key=lambda i: -prepared[i].prompt_len)[:8]
    batch = to_device(loaded, collate(loaded, [prepared[i] for i in order]))
    single = to_device(loaded, collate(loaded, [prepared[order[-1]]]))
    width = single["input_ids"].shape[1]
    print(f"device {DEV}, batch input_ids {tuple(batch['input_ids'].shape)}, "
          f"pixel_values {tuple(batch['pixel_values'].shape)}, single {tuple(single['pixel_values'].shape)}")  # fmt: skip

    def features(inputs):
        out = inner.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"))
        return out.pooler_output  # one tensor per batch row

    def merged(inputs):
        ids = inputs["input_ids"]
        embeds = inner.text_model.get_input_embeddings()(ids)
        feats = features(inputs)
        if hasattr(inner, "inputs_merger"):  # transformers 5.17: block-wise merge, 3-D features
            feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
            shaped = feats.reshape(-1, inner.image_seq_len, feats.shape[-1])
            return inner.inputs_merger(
                input_ids=ids, inputs_embeds=embeds, image_hidden_states=shaped
            )
        feats = torch.cat(list(feats), dim=0)  # 5.24: masked_scatter over the placeholders
        mask = inner.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=feats)
        return embeds.masked_scatter(mask, feats)

    with torch.inference_mode():
        fb, fs = features(batch), features(single)
        if isinstance(fs, torch.Tensor):  # 5.17: one row per real image; the specimen's are last
            fb, fs = fb[-fs.shape[0] :].flatten(0, 1), fs.flatten(0, 1)
        else:  # 5.24: one tensor per batch row
            fb, fs = fb[-1], fs[0]
        print(f"vision  max diff {gap(fb, fs):.2e}  (rows {fb.shape[0]} vs {fs.shape[0]})")
        eb, es = merged(batch), merged(single)
        print(f"merged  max diff {gap(eb[-1, -width:], es[0]):.2e}")
        # the text model alone on identical embeddings: the single row's, left-padded as in the batch
        eb_same = eb.clone()
        eb_same[-1, -width:] = es[0]
        lm = loaded.model.lm_head
        tb = lm(
            inner.text_model(
                inputs_embeds=eb_same, attention_mask=batch["attention_mask"]
            ).last_hidden_state[-1, -1]
        )
        ts = lm(
            inner.text_model(
                inputs_embeds=es, attention_mask=single["attention_mask"]
            ).last_hidden_state[0, -1]
        )
        print(f"text    max diff {gap(tb, ts):.2e}  (same input embeddings)")
        for name, ctx in (("sdpa default", None), ("sdpa math only", SDPBackend.MATH)):
            with sdpa_kernel([ctx]) if ctx is not None else torch.inference_mode():
                lb = loaded.model(**batch).logits[-1, -1]
                ls = loaded.model(**single).logits[0, -1]
            print(f"full    max diff {gap(lb, ls):.2e}  ({name})")
        loaded.model.set_attn_implementation("eager")
        lb = loaded.model(**batch).logits[-1, -1]
        ls = loaded.model(**single).logits[0, -1]
        print(f"full    max diff {gap(lb, ls):.2e}  (eager attention)")


if __name__ == "__main__":
    main()
