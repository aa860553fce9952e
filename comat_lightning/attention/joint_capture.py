"""Capture on the joint attention of MMDiT transformers (SD3 / SD3.5, FLUX.1): the image-query x text-key block.

In joint attention, image and text tokens attend to each other in one softmax over [image; text] (SD3) or
[text; image] (FLUX) keys, so no layer computes "cross-attention" on its own. What the methods read (attribute
concentration, A-STAR, Attend-and-Excite, monitoring) is, per image query, a distribution over the text tokens:
here the image-query x text-key block **renormalised over the text keys**, which is exactly
``softmax(q_img k_text^T / sqrt(d))``: the attention an image token would pay the prompt if it attended to the
prompt alone. Its rows sum to 1 as the UNet maps' do, so every consumer of ``AttentionStore`` works unchanged,
and it does not depend on how much mass the image keys take (which varies with resolution and block).

The layer's output still comes from the fused SDPA on the unchanged queries, keys and values, so capturing changes
nothing in the model's output; the block costs (B, heads, N_img, T) extra, not the full (N, N) matrix. Gradients
flow to the maps through the image queries and text keys.

Layers read: the ``attn`` (joint) module of every SD3 ``JointTransformerBlock`` (not SD3.5's image-only
``attn2``) and of every FLUX double-stream block, named ``transformer_blocks.<i>.attn``, block ``"joint"``, map
side = latent side / 2 (SD3's patch 2, FLUX's 2x2 packing). FLUX's single-stream blocks see text and image as one
sequence without being told where the text ends; they are not read yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from comat_lightning.errors import InputError


def text_block(query: torch.Tensor, key: torch.Tensor, image: slice, text: slice, scale: float) -> torch.Tensor:
    """(B, heads, N_img, T) = softmax over the text keys of the image queries' scores (fp32); q, k (B, heads, N, d)."""
    scores = torch.matmul(query[:, :, image].float(), key[:, :, text].float().transpose(-1, -2)) * scale
    return scores.softmax(dim=-1)


class SD3JointCaptureProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (SD3 / SD3.5 joint attention: keys = [image; text]) that also offers
    the renormalised image x text block to ``store``."""

    def __init__(self, store, layer: str, keep: bool = True):
        self.store, self.layer, self.keep = store, layer, keep

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, n_image = hidden_states.shape[:2]
        heads, head_dim = attn.heads, attn.to_k.out_features // attn.heads

        def split(x):  # (B, N, heads * d) -> (B, heads, N, d)
            return x.view(batch, -1, heads, head_dim).transpose(1, 2)

        query, key, value = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_query = split(attn.add_q_proj(encoder_hidden_states))
        text_key = split(attn.add_k_proj(encoder_hidden_states))
        text_value = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        query, key, value = (torch.cat([a, b], dim=2) for a, b in ((query, text_query), (key, text_key), (value, text_value)))
        probs = text_block(query, key, slice(0, n_image), slice(n_image, None), head_dim**-0.5)
        self.store.offer(self.layer, probs, keep=self.keep)

        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out, text_out = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, text_out


class FluxJointCaptureProcessor:
    """diffusers' ``FluxAttnProcessor`` for the double-stream blocks (keys = [text; image], RoPE on both) that also
    offers the renormalised image x text block to ``store``."""

    def __init__(self, store, layer: str, keep: bool = True):
        self.store, self.layer, self.keep = store, layer, keep

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if encoder_hidden_states is None:
            raise RuntimeError("FluxJointCaptureProcessor reads double-stream (joint) blocks only")
        query, key, value, text_query, text_key, text_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))  # (B, N, heads, d)
        text_query, text_key, text_value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (text_query, text_key, text_value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
        query, key, value = (torch.cat([a, b], dim=1) for a, b in ((text_query, query), (text_key, key), (text_value, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        n_text = encoder_hidden_states.shape[1]
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (B, heads, N, d)
        probs = text_block(query, key, slice(n_text, None), slice(0, n_text), attn.head_dim**-0.5)
        self.store.offer(self.layer, probs, keep=self.keep)

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        text_out, out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(text_out.contiguous())


def joint_processor(transformer: nn.Module, store, layer: str, keep: bool = True):
    """The capture processor of ``transformer``'s family for one joint attention layer."""
    name = type(transformer).__name__
    if name.startswith("SD3"):
        return SD3JointCaptureProcessor(store, layer, keep)
    if name.startswith("Flux"):
        return FluxJointCaptureProcessor(store, layer, keep)
    raise InputError(f"attention capture: {name} is not an SD3 or FLUX transformer")


__all__ = ["FluxJointCaptureProcessor", "SD3JointCaptureProcessor", "joint_processor", "text_block"]
