"""BlipVqa (comat_lightning/judges/vqa.py) against transformers' own BlipForQuestionAnswering loss: P(yes) must be
the two-way softmax of the first answer token's log-likelihoods that the model's forward computes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def vqa():
    from comat_lightning.judges.vqa import BlipVqa

    return BlipVqa("tiny://blip-vqa")


def _first_answer_nll(vqa, image, question: str, answer_id: int) -> float:
    """-log p(answer | [DEC]) from BlipForQuestionAnswering.forward (labels = [DEC, answer]: the decoder predicts
    position 1 from position 0), with the question's first token set as BlipVqa sets it."""
    text = vqa.processor.tokenizer([question], return_tensors="pt")
    ids = text.input_ids.clone()
    ids[:, 0] = vqa.enc_id
    pixels = vqa.processor.image_processor([image], return_tensors="pt").pixel_values
    labels = torch.tensor([[vqa.model.decoder_start_token_id, answer_id]])
    with torch.no_grad():
        return vqa.model(input_ids=ids, attention_mask=text.attention_mask, pixel_values=pixels, labels=labels).loss.item()


def test_yes_probability_matches_transformers_forward(vqa):
    assert vqa.uses_enc_token  # the tiny vocabulary has [ENC], as the official evaluator's tokenizer
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    questions = ["a red car?", "a blue bus and a dog?", "a cat?"]
    ours = vqa.yes_probabilities(images, questions)
    for image, question, p in zip(images, questions, ours.tolist()):
        nll_yes, nll_no = (_first_answer_nll(vqa, image, question, i) for i in (vqa.yes_id, vqa.no_id))
        assert p == pytest.approx(1 / (1 + math.exp(nll_yes - nll_no)), abs=1e-5)
    # batched with padding (questions of different lengths) = one at a time
    alone = torch.cat([vqa.yes_probabilities([i], [q]) for i, q in zip(images, questions)])
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, ours[:1].expand(3))  # images and questions matter
