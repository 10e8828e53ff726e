"""Student initialisation from the teacher: layer map, token-type folding, exact equivalence."""

import jax
import numpy as np
import pytest
import torch
import transformers

from distil_jax import hf, models, student


@pytest.fixture(scope="module")
def teacher(bert_dir):
  return hf.load_bert(bert_dir)


def _embedding_output(config, params, ids, mask):
  return np.asarray(models.Encoder(config).apply({"params": params}, ids, mask).hidden_states[0])


def test_every_other_layer_is_the_papers_map():
  assert student.every_other_layer(12, 6) == [0, 2, 4, 7, 9, 11]
  assert student.every_other_layer(6, 3) == [0, 2, 5]


def test_student_copies_mapped_layers_embeddings_and_head(teacher):
  config, params = teacher
  student_config, student_params = student.student_from_teacher(config, params, [3, 1])
  assert student_config.num_layers == 2 and student_config.is_distilbert
  for i, j in enumerate([3, 1]):
    jax.tree.map(np.testing.assert_array_equal, student_params[f"layer_{i}"],
                 params[f"layer_{j}"])
  jax.tree.map(np.testing.assert_array_equal, student_params["mlm_head"], params["mlm_head"])
  assert "token_type_embeddings" not in student_params["embeddings"]
  assert sorted(student_params) == ["embeddings", "layer_0", "layer_1", "mlm_head"]


def test_head_transform_starts_fresh_as_the_original_does_by_default(teacher):
  config, params = teacher
  _, fresh = student.student_from_teacher(config, params, [0, 2], copy_head_transform=False,
                                          seed=3)
  np.testing.assert_array_equal(fresh["mlm_head"]["bias"], params["mlm_head"]["bias"])
  kernel = fresh["mlm_head"]["transform"]["kernel"]
  assert kernel.shape == params["mlm_head"]["transform"]["kernel"].shape
  assert np.std(kernel) == pytest.approx(0.02, rel=0.1)  # BERT's init, not the teacher's.
  np.testing.assert_array_equal(fresh["mlm_head"]["transform"]["bias"], 0.0)
  np.testing.assert_array_equal(fresh["mlm_head"]["norm"]["scale"], 1.0)
  np.testing.assert_array_equal(fresh["mlm_head"]["norm"]["bias"], 0.0)


def test_folded_token_type_gives_the_teachers_embedding_output(teacher):
  config, params = teacher
  ids = np.array([[101, 2054, 2003, 1996, 3007, 102, 0]])
  mask = (ids != 0).astype(np.int32)
  expected = _embedding_output(config, params, ids, mask)
  folded = student.student_from_teacher(config, params, [0])
  np.testing.assert_allclose(_embedding_output(*folded, ids, mask), expected, atol=1e-6)
  unfolded = student.student_from_teacher(config, params, [0], fold_token_type=False)
  assert np.abs(_embedding_output(*unfolded, ids, mask) - expected).max() > 1e-2


def test_full_depth_student_exported_gives_the_teachers_logits_in_pytorch(bert_dir, teacher,
                                                                          tmp_path):
  config, params = teacher
  student_config, student_params = student.student_from_teacher(
      config, params, range(config.num_layers))
  out = hf.export_distilbert(student_config, student_params, tmp_path / "full")
  ids = np.array([[101, 7592, 2088, 2003, 1037, 3376, 2173, 102],
                  [101, 2009, 2003, 102, 0, 0, 0, 0]])
  mask = torch.tensor((ids != 0).astype(np.int64))
  with torch.no_grad():
    exported = transformers.DistilBertForMaskedLM.from_pretrained(out).eval()(
        input_ids=torch.tensor(ids), attention_mask=mask).logits.numpy()
    teacher_torch = transformers.BertForMaskedLM.from_pretrained(bert_dir).eval()(
        input_ids=torch.tensor(ids), attention_mask=mask).logits.numpy()
  assert np.abs(exported - teacher_torch).max() < 1e-4


@pytest.mark.parametrize("layers", [[0, 4], [-1], []])
def test_layer_map_naming_missing_layers_is_refused(teacher, layers):
  config, params = teacher
  with pytest.raises(ValueError, match=r"must name teacher layers 0..3 \(the teacher has 4\)"):
    student.student_from_teacher(config, params, layers)
