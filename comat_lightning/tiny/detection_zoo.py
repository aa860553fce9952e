"""Tiny, offline stand-ins for GroundingDINO and SAM (the mask providers' detector and segmenter).

Registered in :mod:`comat_lightning.tiny.zoo` as ``tiny://grounding-dino`` and ``tiny://sam``: built here from
configs with fixed seeds, written with ``save_pretrained`` (model + processor) and loaded back by
:class:`comat_lightning.GroundedSAMMasks` through the same ``from_pretrained`` calls a hub id takes.

Both work on 64 px images (the tiny Stable Diffusion's output size). Their weights are random: they exercise
shapes, thresholds and the plumbing between detector and segmenter, not detection quality.
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 64  # px; both processors resize to this, so 64 px images pass through unchanged

# GroundingDINO's modeling code hard-codes BERT-base-uncased ids for the phrase delimiters it splits the text
# on ([CLS] 101, [SEP] 102, "." 1012, "?" 1029) and for [PAD] (0), so the tiny vocab keeps BERT's layout for
# those five tokens and fills the gaps with [unusedN] entries (as BERT's own vocab does).
_BERT_FIXED_IDS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}


def grounding_dino_vocab() -> list[str]:
    """WordPiece vocab in BERT-uncased layout: fixed special/delimiter ids, every word of tiny.tokenizers.WORDS a single
    token, then letters, digits and their ``##`` continuations so that any lower-case word still tokenizes."""
    from comat_lightning.tiny.tokenizers import WORDS

    size = max(_BERT_FIXED_IDS) + 1
    vocab = [_BERT_FIXED_IDS.get(i, f"[unused{i}]") for i in range(size)]
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    extra = list(dict.fromkeys(WORDS)) + list(letters) + ["##" + c for c in letters] + list(",!;:'\"-()/&")
    return vocab + [tok for tok in extra if tok not in vocab]


def build_grounding_dino(folder: Path) -> None:
    """GroundingDINO with a 4-stage Swin backbone (8 -> 64 channels), a 2-layer BERT, d_model 32, 1 encoder and
    2 decoder layers, 30 queries; ~0.2 M parameters. Processor: GroundingDinoImageProcessor at 64 px + a BERT
    tokenizer."""
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(grounding_dino_vocab()) + "\n")
    tokenizer = BertTokenizer(str(vocab_file), model_max_length=256)
    config = GroundingDinoConfig(
        backbone_config=dict(
            model_type="swin",
            image_size=IMAGE_SIZE,
            patch_size=4,  # 64 px -> 16x16 tokens; stages at 16, 8, 4, 2
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=4,
            mlp_ratio=2.0,
            # Levels at 16, 8 and 4 px, plus the extra strided level at 2 px. (The real model's stage2-4 would leave a
            # 1x1 extra level here, on which GroupNorm fails for a single image.)
            out_features=["stage1", "stage2", "stage3"],
        ),
        text_config=dict(
            model_type="bert",
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id,
        ),
        d_model=32,
        num_queries=30,
        encoder_layers=1,
        decoder_layers=2,  # 1 breaks transformers' weight tying of the per-layer box heads (bbox_embed.0 -> 1..)
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_feature_levels=4,  # 3 backbone levels + one extra strided conv level
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=256,
        disable_custom_kernels=True,
    )
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(config).eval()
    # A random model's box-to-token logits are dot products of two LayerNorm outputs (std ~ sqrt(d_model) ~ 6), so
    # nearly every token probability saturates at 0 or 1. Shrinking the decoder's final LayerNorm spreads them over
    # (0, 1), which the threshold tests need.
    with torch.no_grad():
        model.model.decoder.layer_norm.weight.mul_(0.2)
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": IMAGE_SIZE, "longest_edge": IMAGE_SIZE})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)


def build_sam(folder: Path) -> None:
    """SAM with a 2-layer ViT (hidden 32, patch 8: 64 px -> 8x8 embeddings), prompt encoder and 2-layer two-way
    mask decoder of width 32; ~0.1 M parameters. Processor: SamImageProcessor resizing and padding to 64 px."""
    from transformers import SamConfig, SamImageProcessorPil, SamModel, SamProcessor

    patch = 8
    config = SamConfig(
        vision_config=dict(
            hidden_size=32,
            output_channels=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=patch,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=16,  # the prompt encoder's positional embedding is 2 * 16 = output_channels wide
            mlp_dim=64,
            # SamVisionConfig defaults to 1e-10, which makes a random encoder output (almost) the same embedding for
            # every image; 0.02 as in the other sub-configs.
            initializer_range=0.02,
        ),
        prompt_encoder_config=dict(hidden_size=32, image_size=IMAGE_SIZE, patch_size=patch, mask_input_channels=4),
        mask_decoder_config=dict(
            hidden_size=32,
            mlp_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            iou_head_hidden_dim=32,
        ),
    )
    torch.manual_seed(0)
    model = SamModel(config).eval()
    image_processor = SamImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE},
        pad_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        mask_size={"longest_edge": IMAGE_SIZE // 4},
        mask_pad_size={"height": IMAGE_SIZE // 4, "width": IMAGE_SIZE // 4},
    )
    folder.mkdir(parents=True, exist_ok=True)
    SamProcessor(image_processor=image_processor).save_pretrained(folder)
    model.save_pretrained(folder)


def build_mask2former(folder: Path) -> None:
    """A Mask2Former for COCO instance segmentation (a 4-stage Swin of width 32, 10 queries, 80 classes: GenEval's
    judge maps them by index to its class names), with its image processor at 64 px."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])  # fmt: skip
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
        dim_feedforward=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=10,
        id2label={i: f"class{i}" for i in range(80)}, label2id={f"class{i}": i for i in range(80)},
        use_pretrained_backbone=False,
    )  # fmt: skip
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(folder)
    Mask2FormerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
