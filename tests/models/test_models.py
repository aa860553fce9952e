"""Model loading: families, UNet override, and clear errors for what an offline machine gets wrong."""

from __future__ import annotations

import pytest

from comat_lightning.models.backbone import DiffusionBackbone, detect_family, load_tokenizer


def test_family_detection_and_components(tiny_paths):
    assert detect_family(tiny_paths["sd"]) == "sd"
    assert detect_family(tiny_paths["sdxl"]) == "sdxl"
    sdxl = DiffusionBackbone.from_pretrained(tiny_paths["sdxl"])
    assert len(sdxl.text_encoders) == 2 and len(sdxl.tokenizers) == 2
    assert sdxl.tokenizers[1].pad_token == "!"
    cond = sdxl.encode_prompts(["a red car", "a cat"], resolution=64)
    assert cond.embeds.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
    assert cond.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    assert sdxl.scheduler_config["_class_name"] == "EulerDiscreteScheduler"


def test_empty_tokenizer_is_an_error_naming_the_path(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(OSError, match=f"{tmp_path}/tokenizer has only 2 tokens"):
        load_tokenizer(str(tmp_path))


def test_unet_override_from_folder_with_or_without_unet_subfolder(tiny_paths, tmp_path):
    import torch

    base = DiffusionBackbone.from_pretrained(tiny_paths["sd"])
    with torch.no_grad():
        base.unet.conv_out.bias.fill_(0.25)
    base.unet.save_pretrained(tmp_path / "bare")
    base.unet.save_pretrained(tmp_path / "pipe" / "unet")
    for override in (tmp_path / "bare", tmp_path / "pipe"):
        loaded = DiffusionBackbone.from_pretrained(tiny_paths["sd"], unet_path=str(override))
        assert torch.all(loaded.unet.conv_out.bias == 0.25)


def test_unet_of_another_family_is_refused(tiny_paths):
    with pytest.raises(ValueError, match="does not belong to this model family"):
        DiffusionBackbone.from_pretrained(tiny_paths["sd"], unet_path=tiny_paths["sdxl"])


def test_missing_model_folder_and_non_pipeline_folder(tmp_path):
    with pytest.raises(OSError, match="not a local folder"):
        DiffusionBackbone.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        DiffusionBackbone.from_pretrained(str(tmp_path))


def test_unknown_tiny_model_name():
    from comat_lightning.tiny.zoo import resolve_model_path

    with pytest.raises(ValueError, match="unknown tiny model"):
        resolve_model_path("tiny://sd4")
