"""Full-size SD1.5, SDXL, SD3.5-Medium, FLUX.1-dev and BLIP-large architectures, for speed and memory benchmarks.

Speed, memory and FLOPs depend on the architecture, not on the weights, so the published configs (layer widths,
depths, heads, context sizes) are rebuilt here and saved in the hub's folder layout; the benchmark then loads them
through the same ``from_pretrained`` path as real checkpoints. Tokenizers are the tiny zoo's hand-made ones (the
text encoders keep the published 49,408-token CLIP and 32,128-token T5 embedding tables).

- ``sd15``, ``sdxl``, ``blip-large``: random weights, saved in bf16 (half the disk); they load on any machine.
- ``sd35-medium``, ``flux-dev``: **configs only**, no weight files (SD3.5-Medium with its T5-XXL is 8.2 B parameters,
  FLUX.1-dev 16.9 B: 16 / 34 GB in bf16, more than this kind of machine holds). The models are built on the meta
  device to check that the installed classes accept the published values, and only their config files, tokenizers
  and ``model_index.json`` are written (seconds, a few MB). They load only inside :func:`fake_loading` (shape-only
  runs, ``bench_scale.py --shape-only``), where every ``from_pretrained`` of such a folder builds the model from its
  config with fake tensors (shapes and dtypes, no storage).

    python benchmarks/full_size_models.py --out /tmp/full_size   # -> /tmp/full_size/{sd15,sdxl,...,blip-large}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLIP_VOCAB = 49408
T5_VOCAB = 32128
CONFIGS_ONLY = "configs_only.json"  # marks a pipeline folder without weight files (loads only under fake_loading)


def _clip_text(hidden: int, layers: int, heads: int, intermediate: int, projection: int, tok, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection, hidden_act=act,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip


def _sd_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                         scaling_factor=scaling_factor)  # fmt: skip


def build_sd15(folder: Path) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from comat_lightning.tiny.tokenizers import clip_tokenizer
    from comat_lightning.tiny.zoo import _SD_SCHEDULER

    tokenizer = clip_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # defaults = SD 1.x
    text_encoder = CLIPTextModel(_clip_text(768, 12, 12, 3072, 768, tokenizer))  # CLIP ViT-L/14's text tower
    pipe = StableDiffusionPipeline(unet=unet, vae=_sd_vae(0.18215), text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=PNDMScheduler.from_config(_SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.to(torch.bfloat16).save_pretrained(folder)


def build_sdxl(folder: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from comat_lightning.tiny.tokenizers import clip_tokenizer
    from comat_lightning.tiny.zoo import _SDXL_SCHEDULER

    tokenizer = clip_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")
    tokenizer_2 = clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )  # fmt: skip
    text_encoder = CLIPTextModel(_clip_text(768, 12, 12, 3072, 768, tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text(1280, 32, 20, 5120, 1280, tokenizer_2, act="gelu"))  # OpenCLIP bigG
    pipe = StableDiffusionXLPipeline(unet=unet, vae=_sd_vae(0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                     scheduler=EulerDiscreteScheduler.from_config(_SDXL_SCHEDULER))  # fmt: skip
    pipe.to(torch.bfloat16).save_pretrained(folder)


def build_blip_large(folder: Path) -> None:
    """Salesforce/blip-image-captioning-large: ViT-L/16 at 384 px, BERT-base text decoder with cross-attention."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from comat_lightning.tiny.tokenizers import bert_tokenizer

    tokenizer = bert_tokenizer(folder)
    config = BlipConfig(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=384, patch_size=16),
        text_config=dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, encoder_hidden_size=1024, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id),
        projection_dim=256,
    )  # fmt: skip
    model = BlipForConditionalGeneration(config).to(torch.bfloat16)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)


# ------------------------------------------------------------------------------------------ MMDiT families (configs only)
def _t5_xxl(dtype: str):
    """google/t5-v1_1-xxl's encoder, as the SD3 / FLUX.1 pipelines ship it (``dtype``: the hub config's entry, which
    transformers' default ``dtype="auto"`` loads it in)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=T5_VOCAB, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                      dropout_rate=0.1, layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0, is_encoder_decoder=True, dtype=dtype)  # fmt: skip
    return T5EncoderModel(config)


def _vae_16ch(scaling_factor: float, shift_factor: float):
    """The 16-channel VAE of SD3 / SD3.5 and FLUX.1 (the same architecture; different latent statistics)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, sample_size=1024,
                         scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
                         use_post_quant_conv=False, force_upcast=True, mid_block_add_attention=True)  # fmt: skip


def _with_dtype(model, dtype: str):
    model.config.dtype = dtype  # what the hub's config.json says; transformers' default dtype="auto" loads that
    return model


def _save_configs_only(pipe, folder: Path) -> None:
    """``model_index.json`` and every component's config / tokenizer files of ``pipe`` (its models on the meta
    device), no weights; the folder is marked :data:`CONFIGS_ONLY`."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(folder)  # model_index.json: [library, class] of every component
    for name, component in pipe.components.items():
        if component is None:
            continue
        if isinstance(component, PreTrainedModel):
            component.config.save_pretrained(folder / name)
        elif isinstance(component, ModelMixin):
            component.save_config(folder / name)
        else:  # scheduler (save_config), tokenizers
            component.save_pretrained(folder / name)
    (folder / CONFIGS_ONLY).write_text(json.dumps({"weights": "none: load under benchmarks.full_size_models.fake_loading"}))


def build_sd35_medium(folder: Path) -> None:
    """stabilityai/stable-diffusion-3.5-medium: MMDiT-X (24 blocks of 24 x 64 heads, extra image self-attention in
    blocks 0-12, RMS q/k norm), CLIP-L and OpenCLIP bigG with projections, T5-XXL, 16-channel VAE, shift 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from comat_lightning.tiny.tokenizers import clip_tokenizer
    from comat_lightning.tiny.transformer_zoo import _SD3_SCHEDULER, t5_tokenizer

    tokenizer = clip_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")
    tokenizer_2 = clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    tokenizer_3 = t5_tokenizer(folder / "tokenizer_3", model_max_length=512)  # the pipeline cuts at 256 tokens
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
        )  # fmt: skip
        text_encoder = _with_dtype(CLIPTextModelWithProjection(_clip_text(768, 12, 12, 3072, 768, tokenizer)), "float16")
        text_encoder_2 = _with_dtype(CLIPTextModelWithProjection(_clip_text(1280, 32, 20, 5120, 1280, tokenizer_2, act="gelu")), "float16")
        text_encoder_3 = _t5_xxl("float16")
        vae = _vae_16ch(scaling_factor=1.5305, shift_factor=0.0609)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(_SD3_SCHEDULER),
                                    vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                                    tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)  # fmt: skip
    _save_configs_only(pipe, folder)


def build_flux_dev(folder: Path) -> None:
    """black-forest-labs/FLUX.1-dev: 19 double-stream + 38 single-stream blocks of 24 x 128 heads, RoPE axes
    (16, 56, 56), guidance embedding; CLIP-L (pooled), T5-XXL (512 tokens), 16-channel VAE, dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from comat_lightning.tiny.tokenizers import clip_tokenizer
    from comat_lightning.tiny.transformer_zoo import _FLUX_SCHEDULER, t5_tokenizer

    tokenizer = clip_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")
    tokenizer_2 = t5_tokenizer(folder / "tokenizer_2", model_max_length=512)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        )  # fmt: skip
        text_encoder = _with_dtype(CLIPTextModel(_clip_text(768, 12, 12, 3072, 768, tokenizer)), "bfloat16")
        text_encoder_2 = _t5_xxl("bfloat16")
        vae = _vae_16ch(scaling_factor=0.3611, shift_factor=0.1159)
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(_FLUX_SCHEDULER), vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)  # fmt: skip
    _save_configs_only(pipe, folder)


def configs_only_copy(pipeline: Path, folder: Path) -> Path:
    """A configs-only copy of the saved pipeline ``pipeline`` in ``folder``: every file but the weights, marked
    :data:`CONFIGS_ONLY` (a model that loads both ways: the check that fake loading changes no estimate)."""
    import shutil

    shutil.copytree(pipeline, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json"))
    (folder / CONFIGS_ONLY).write_text(json.dumps({"weights": "none: a configs-only copy of " + str(pipeline)}))
    return folder


def configs_only(path) -> bool:
    """Whether ``path`` (a pipeline folder, or a component folder inside one) was written by a configs-only builder."""
    path = Path(str(path))
    return any((folder / CONFIGS_ONLY).exists() for folder in (path, path.parent))


def _fake_diffusers_model(cls, folder: Path, dtype, fake_mode):
    config = cls.load_config(folder)
    with fake_mode:
        model = cls.from_config(config)
        if dtype is not None:
            model = model.to(dtype)
    return model.eval()  # as from_pretrained: fp32 unless a dtype is given (diffusers' default)


def _fake_transformers_model(cls, folder: Path, dtype, fake_mode):
    config = cls.config_class.from_pretrained(folder)
    dtype = dtype if dtype not in (None, "auto") else (config.dtype or torch.float32)  # transformers' dtype="auto"
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with fake_mode:
        model = cls._from_config(config, dtype=dtype)
        plan = model._get_dtype_plan(dtype)  # from_pretrained's keep-in-fp32 rule (T5's ``wo`` when loaded in fp16)
        for name, param in model.named_parameters():
            kept = next((kept for module, kept in plan.items() if re.search(rf"(^|\.){re.escape(module)}(\.|$)", name)), None)
            if kept is not None:
                param.data = param.data.to(kept)
    return model.eval()


@contextlib.contextmanager
def fake_loading(fake_mode):
    """Inside this context, ``from_pretrained`` of a diffusers or transformers model from a configs-only folder
    (:func:`configs_only`) builds it from its config with fake tensors of ``fake_mode`` (FakeTensorMode): the
    parameters and buffers have the shapes and dtypes a real load gives (fp32 for diffusers models unless
    ``torch_dtype`` is given; the config's ``dtype`` for transformers models, as ``dtype="auto"``) and no storage.
    Every other folder loads for real. The shape-only fit must use the same ``fake_mode``."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    originals = {base: base.__dict__["from_pretrained"] for base in (ModelMixin, PreTrainedModel)}
    builders = {ModelMixin: _fake_diffusers_model, PreTrainedModel: _fake_transformers_model}

    def patched(base):
        original = originals[base].__func__

        def from_pretrained(cls, path, *args, **kwargs):
            folder = Path(str(path)) / (kwargs.get("subfolder") or "")
            if not configs_only(folder):
                return original(cls, path, *args, **kwargs)
            dtype = kwargs.get("torch_dtype") if kwargs.get("torch_dtype") is not None else kwargs.get("dtype")
            return builders[base](cls, folder, dtype, fake_mode)

        return classmethod(from_pretrained)

    for base in originals:
        setattr(base, "from_pretrained", patched(base))
    try:
        yield
    finally:
        for base, original in originals.items():
            setattr(base, "from_pretrained", original)


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl, "sd35-medium": build_sd35_medium, "flux-dev": build_flux_dev,
            "blip-large": build_blip_large}  # fmt: skip


def ensure(root: Path, name: str, device: str = "cpu") -> Path:
    """The folder of ``name`` under ``root``, built on first use (marked complete only when fully written). With
    ``device="cuda"`` the random weights are made on the GPU (SDXL's 2.6 B parameters take about a minute to
    initialise on a CPU, a second there); the saved files are the same format either way. The configs-only models
    (``sd35-medium``, ``flux-dev``) take seconds on any device."""
    folder = root / name
    if not (folder / ".complete").exists():
        torch.manual_seed(0)
        with torch.device(device):  # factory functions (parameter creation and init) default to ``device``
            BUILDERS[name](folder)
        made = {"weights": "none (configs only)"} if configs_only(folder) else {"initialised_on": device}
        (folder / ".complete").write_text(json.dumps({"name": name, **made}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/comat_full_size")
    parser.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--device", default="cpu", help="where the random weights are initialised (cuda: much faster)")
    args = parser.parse_args()
    for name in args.models:
        print(ensure(Path(args.out), name, args.device))


if __name__ == "__main__":
    main()
