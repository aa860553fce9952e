"""BLIP-VQA's probability of answering "yes", as T2I-CompBench's attribute-binding score reads it.

The official evaluator (Karine-Huang/T2I-CompBench ``BLIPvqa_eval/models/blip_vqa.py``, mode ``vqa_prob``) encodes
the image with the ViT, the question with the text encoder (its first token replaced by ``[ENC]``) attending to the
image, runs the answer decoder for one step from ``[DEC]`` attending to the question (with the question's padding
mask), and takes p("yes") / (p("yes") + p("no")) of that step's softmax. ``transformers``' ``BlipForQuestionAnswering``
holds the same three parts; this runs them in that order instead of ``generate`` (which answers a word, not a
probability, and ignores the question's padding mask).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

DEFAULT_VQA_MODEL = "Salesforce/blip-vqa-capfilt-large"  # the official checkpoint (model_base_vqa_capfilt_large)


class BlipVqa:
    """P(yes) for (image, question) pairs with the BLIP VQA model at ``path`` (hub id, folder or ``tiny://blip-vqa``).

    ``enc_token``: the token put first in every question, as the official code does; the hub tokenizers of the
    converted checkpoints carry no ``[ENC]``, so it falls back to the tokenizer's own first token ([CLS]) when the
    vocabulary lacks it (``uses_enc_token`` says which). ``image_size``: the side images are resized to (the
    official evaluator runs at 480 px; the converted checkpoints' processors say 384, and their position embeddings
    are interpolated when another size is asked)."""

    def __init__(self, path: str = DEFAULT_VQA_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 enc_token: str = "[ENC]", image_size: Optional[int] = None):  # fmt: skip
        from transformers import BlipForQuestionAnswering, BlipProcessor

        from comat_lightning.tiny.zoo import resolve_model_path

        folder = resolve_model_path(path)
        self.processor = BlipProcessor.from_pretrained(folder)
        self.model = BlipForQuestionAnswering.from_pretrained(folder, torch_dtype=dtype).to(device).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        tokenizer = self.processor.tokenizer
        enc_id = tokenizer.convert_tokens_to_ids(enc_token)
        self.uses_enc_token = enc_id is not None and enc_id != tokenizer.unk_token_id
        self.enc_id = enc_id if self.uses_enc_token else None
        self.yes_id, self.no_id = (tokenizer.convert_tokens_to_ids(word) for word in ("yes", "no"))
        if tokenizer.unk_token_id in (self.yes_id, self.no_id):
            raise ValueError(f"{path}: the tokenizer has no single token for 'yes' / 'no'; not a BLIP VQA model")
        self.image_size = image_size or self.processor.image_processor.size["height"]
        self.native_size = self.model.config.vision_config.image_size

    @torch.no_grad()
    def yes_probabilities(self, images: Sequence, questions: Sequence[str]) -> torch.Tensor:
        """(N,) P(yes) for N images (PIL images or uint8 arrays) and N questions (one each). Questions run in groups
        of equal token length, unpadded: transformers' BLIP text decoder adds its cross-attention padding mask as
        a boolean (measured with transformers 5.23: a padded batch moved P(yes) by 0.015), so padding would leak."""
        size = {"height": self.image_size, "width": self.image_size}
        pixels = self.processor.image_processor(list(images), size=size, return_tensors="pt").pixel_values
        tokenized = [self.processor.tokenizer(q, truncation=True, max_length=35).input_ids for q in questions]
        out = torch.empty(len(questions))
        for length in sorted({len(ids) for ids in tokenized}):
            rows = [i for i, ids in enumerate(tokenized) if len(ids) == length]
            ids = torch.tensor([tokenized[i] for i in rows], device=self.device)
            out[rows] = self._yes(pixels[rows].to(self.device, self.dtype), ids).cpu()
        return out

    def _yes(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """P(yes) of a batch of questions of one length (no padding)."""
        if self.enc_id is not None:
            ids[:, 0] = self.enc_id
        model = self.model
        image_embeds = model.vision_model(pixel_values=pixels, interpolate_pos_encoding=self.image_size != self.native_size)[0]
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        question = model.text_encoder(input_ids=ids, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask, return_dict=False)[0]
        start = torch.full((len(ids), 1), model.decoder_start_token_id, device=self.device)
        logits = model.text_decoder(input_ids=start, encoder_hidden_states=question, return_dict=True).logits[:, 0].float()  # (N, vocab)
        return torch.sigmoid(logits[:, self.yes_id] - logits[:, self.no_id])  # = p_yes / (p_yes + p_no)
