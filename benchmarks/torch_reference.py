"""The distillation step in PyTorch, the original's way, to time ours against and check its losses.

HuggingFace `BertForMaskedLM` teacher (eval mode, forward under `torch.no_grad()`) and
`DistilBertForMaskedLM` student (train mode: dropout on), both loaded from our Flax parameters.
The losses are those of the original distiller (huggingface/transformers, research_projects/
distillation): logits selected by a boolean mask, `KLDivLoss(batchmean)` at temperature T times
T², `CrossEntropyLoss(ignore_index=-100)`, `CosineEmbeddingLoss` on the last hidden states of the
real tokens, `MSELoss(sum)` when its weight is not 0. Then global-norm clipping and
`torch.optim.AdamW` with no weight decay on biases and LayerNorm, as `optim.make_optimizer`.

With `restrict_ce_to_mask` (L_ce on masked positions only), the vocabulary projection runs only
on the masked positions' hidden states (`model.distilbert(...)`, then the MLM head on the gathered
rows), as our step's gather does; without it, the logits are computed at every position, as the
original does.
"""

import pathlib
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from distil_jax import hf, losses, models


def from_flax(config: models.ModelConfig, params: dict) -> transformers.PreTrainedModel:
  """Our parameters as a HuggingFace MLM model (exported, then loaded by `from_pretrained`)."""
  with tempfile.TemporaryDirectory() as work:
    directory = hf.export_hf(config, params, pathlib.Path(work) / "model")
    model_class = (transformers.DistilBertForMaskedLM if config.is_distilbert
                   else transformers.BertForMaskedLM)
    return model_class.from_pretrained(directory)


def mlm_head(model: transformers.PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
  """The model's MLM head (transform, LayerNorm, tied decoder) on `hidden` [..., dim]."""
  if isinstance(model, transformers.BertForMaskedLM):
    return model.cls(hidden)
  return model.vocab_projector(model.vocab_layer_norm(model.activation(
      model.vocab_transform(hidden))))


class Distiller:
  """One train step of `student` from `teacher`: losses, backward, clipping, AdamW."""

  def __init__(self, teacher: transformers.BertForMaskedLM,
               student: transformers.DistilBertForMaskedLM, *, restrict_ce_to_mask: bool,
               weights: losses.LossWeights = losses.DEFAULT_WEIGHTS,
               lr: float = 1e-4, b1: float = 0.9, b2: float = 0.98, eps: float = 1e-6,
               weight_decay: float = 0.0, clip_norm: float = 5.0):
    self.teacher, self.student = teacher.eval(), student.train()
    self.restrict_ce_to_mask = restrict_ce_to_mask
    self.weights, self.clip_norm = weights, clip_norm
    decays = lambda name: name.endswith(".weight") and "norm" not in name.lower()
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if decays(n)], "weight_decay": weight_decay},
              {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}]
    self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=eps)

  def _outputs(self, model, ids, attention_mask, positions):
    """(logits at `positions` [n, vocab] or everywhere [batch, seq, vocab], last hidden)."""
    hidden = model.base_model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    return mlm_head(model, hidden if positions is None else hidden[positions]), hidden

  def losses(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The total ("loss") and each part of the student's loss on `batch` (numpy arrays)."""
    ids, attention_mask, labels = (torch.as_tensor(np.asarray(batch[k]), dtype=torch.long)
                                   for k in ("input_ids", "attention_mask", "labels"))
    masked, real = labels != losses.IGNORE_INDEX, attention_mask > 0
    positions = masked if self.restrict_ce_to_mask else None
    with torch.no_grad():
      t_logits, t_hidden = self._outputs(self.teacher, ids, attention_mask, positions)
    s_logits, s_hidden = self._outputs(self.student, ids, attention_mask, positions)
    if self.restrict_ce_to_mask:  # The logits are the masked positions' already.
      labels, s_selected, t_selected = labels[masked], s_logits, t_logits
    else:
      s_selected, t_selected = s_logits[real], t_logits[real]
    w = self.weights
    parts = {
        "loss_ce": F.kl_div(F.log_softmax(s_selected / w.temperature, dim=-1),
                            F.softmax(t_selected / w.temperature, dim=-1),
                            reduction="batchmean") * w.temperature**2,
        "loss_mlm": F.cross_entropy(s_logits.flatten(0, -2), labels.flatten(),
                                    ignore_index=losses.IGNORE_INDEX),
    }
    s_real, t_real = s_hidden[real], t_hidden[real]
    parts["loss_cos"] = F.cosine_embedding_loss(s_real, t_real, s_real.new_ones(len(s_real)))
    total = w.alpha_ce * parts["loss_ce"] + w.alpha_mlm * parts["loss_mlm"] + (
        w.alpha_cos * parts["loss_cos"])
    if w.alpha_mse:
      parts["loss_mse"] = F.mse_loss(s_selected, t_selected, reduction="sum") / len(s_selected)
      total = total + w.alpha_mse * parts["loss_mse"]
    return {"loss": total, **parts}

  def step(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
    """One update on `batch`; returns the losses before it."""
    self.optimizer.zero_grad(set_to_none=True)
    parts = self.losses(batch)
    parts["loss"].backward()
    torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip_norm)
    self.optimizer.step()
    return {k: float(v.detach()) for k, v in parts.items()}
