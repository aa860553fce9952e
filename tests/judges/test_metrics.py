"""Metrics: hand-computed values, and the same values after a real 2-process DDP reduction (gloo, CPU)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from comat_lightning.judges.metrics import CaptionNLL, ConceptOverlap, PromptCLIPScore

# ------------------------------------------------------------------------------------------------ CaptionNLL


def test_caption_nll_sample_and_token_mean_over_two_updates():
    nll_1, counts_1 = torch.tensor([1.0, 2.0]), torch.tensor([3, 1])
    nll_2, counts_2 = torch.tensor([4.0]), torch.tensor([4])
    sample, token = CaptionNLL("sample_mean"), CaptionNLL("token_mean")
    for metric in (sample, token):
        metric.update(nll_1, counts_1)
        metric.update(nll_2, counts_2)
    assert_close(sample.compute(), torch.tensor((1.0 + 2.0 + 4.0) / 3))
    assert_close(token.compute(), torch.tensor((1.0 * 3 + 2.0 * 1 + 4.0 * 4) / (3 + 1 + 4)))


def test_caption_nll_token_mean_matches_reduce_caption_nll_on_one_batch():
    from comat_lightning.judges.captioner import reduce_caption_nll

    nll, counts = torch.tensor([0.5, 1.5, 3.0]), torch.tensor([2, 5, 1])
    for reduction in ("sample_mean", "token_mean"):
        metric = CaptionNLL(reduction)
        metric.update(nll, counts)
        assert_close(metric.compute(), reduce_caption_nll(nll, counts, reduction))


def test_caption_nll_rejects_bad_shapes_and_reduction():
    metric = CaptionNLL()
    with pytest.raises(ValueError, match="1-D"):
        metric.update(torch.ones(2, 1), torch.ones(2))
    with pytest.raises(ValueError, match="samples"):
        metric.update(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        CaptionNLL("mean")
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(CaptionNLL().compute())


# -------------------------------------------------------------------------------------------- ConceptOverlap

A = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
B = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # overlap(A, B) = sum(min) / sum(A + B) = 1 / 7
DISJOINT = torch.tensor([[0.0, 0.0], [0.0, 5.0]])  # no pixel in common with A


def _overlap_of(*images: torch.Tensor) -> ConceptOverlap:
    metric = ConceptOverlap()
    metric.update(list(images))
    return metric


def test_concept_overlap_disjoint_identical_and_partial():
    assert_close(_overlap_of(torch.stack([A, DISJOINT])).compute(), torch.tensor(0.0))
    assert_close(_overlap_of(torch.stack([A, A])).compute(), torch.tensor(0.5))
    assert_close(_overlap_of(torch.stack([A, B])).compute(), torch.tensor(1 / 7))


def test_concept_overlap_means_over_pairs_steps_and_images():
    # Three concepts: pairs (A, B) = 1/7, (A, A) = 1/2, (B, A) = 1/7.
    assert_close(_overlap_of(torch.stack([A, B, A])).compute(), torch.tensor((1 / 7 + 0.5 + 1 / 7) / 3))
    # Two steps (S, C, r, r): 1/7 at the first, 1/2 at the second.
    steps = torch.stack([torch.stack([A, B]), torch.stack([A, A])])
    assert_close(_overlap_of(steps).compute(), torch.tensor((1 / 7 + 0.5) / 2))
    # Two images, then the mean over images.
    metric = _overlap_of(torch.stack([A, B]))
    metric.update([torch.stack([A, DISJOINT])])
    assert_close(metric.compute(), torch.tensor((1 / 7 + 0.0) / 2))


def test_concept_overlap_skips_images_with_one_concept():
    metric = _overlap_of(A[None], torch.stack([A, B]), torch.stack([A])[None])  # (1, r, r) and (1, 1, r, r)
    assert_close(metric.compute(), torch.tensor(1 / 7))
    assert int(metric.counted) == 1 and int(metric.skipped) == 2
    only_skipped = _overlap_of(A[None])
    assert torch.isnan(only_skipped.compute()) and int(only_skipped.skipped) == 1


def test_concept_overlap_rejects_bad_input():
    with pytest.raises(TypeError, match="sequence"):
        ConceptOverlap().update(torch.stack([A, B]))
    with pytest.raises(ValueError, match="image 0"):
        ConceptOverlap().update([A])


# ---------------------------------------------------------------------------------------------- CLIP score

PROMPTS = ["a red cat", "a blue dog on the grass", "two zebras", "a photo of a cube next to a sphere", "a lamp"]


def _clip_images(n: int) -> torch.Tensor:
    # Slightly outside [0, 1], so that the clamp matters.
    return torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(0)) * 1.4 - 0.2


def _clip_scores_by_hand(path: str, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Per-pair 100 * cos(E_I, E_T), computed with CLIPModel and CLIPProcessor directly (not floored)."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    pixels = [(image.clamp(0, 1) * 255).round().to(torch.uint8) for image in images]
    with torch.no_grad():
        image_embeds = model.get_image_features(**processor(images=pixels, return_tensors="pt")).pooler_output
        text_embeds = model.get_text_features(**processor(text=prompts, padding=True, return_tensors="pt")).pooler_output
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return 100 * (image_embeds * text_embeds).sum(dim=-1)


def test_prompt_clip_score_matches_hand_computation(tiny_paths):
    images = _clip_images(len(PROMPTS))
    by_hand = _clip_scores_by_hand(tiny_paths["clip"], images, PROMPTS)
    # The tiny random CLIP gives both signs, so the per-pair floor at 0 is exercised.
    assert (by_hand > 0).any() and (by_hand < 0).any()

    metric = PromptCLIPScore("tiny://clip")  # the same folder as tiny_paths["clip"], via resolve_model_path
    batch_value = metric(images[:2], PROMPTS[:2])  # forward: this batch's value, and accumulates
    assert_close(batch_value, by_hand[:2].clamp(min=0).mean())
    metric.update(images[2:], PROMPTS[2:])
    assert_close(metric.compute(), by_hand.clamp(min=0).mean())


def test_prompt_clip_score_is_frozen_and_not_in_checkpoints(tiny_paths):
    holder = torch.nn.Module()
    holder.clip = PromptCLIPScore(tiny_paths["clip"])
    holder.train()
    assert not holder.clip.model.training
    assert not any(p.requires_grad for p in holder.clip.model.parameters())

    assert not any(".model." in key for key in holder.state_dict())
    weight = holder.clip.model.text_projection.weight.clone()
    holder.load_state_dict(holder.state_dict(), strict=True)  # works although the CLIP weights are absent
    assert_close(holder.clip.model.text_projection.weight, weight)

    with pytest.raises(ValueError, match="prompts"):
        holder.clip.update(_clip_images(2), ["only one"])
    with pytest.raises(ValueError, match="images"):
        holder.clip.update(_clip_images(2)[:, :1], ["a", "b"])


# ----------------------------------------------------------------------------------------------------- DDP

SHARES = (3, 2)  # uneven, so that a mean of per-rank means would differ from the mean over all samples


def _dataset() -> dict:
    """A fixed dataset of 5 samples, identical in every process."""
    g = torch.Generator().manual_seed(1)
    num_concepts = [2, 3, 4, 1, 2]  # the fourth image has one concept: skipped (3 counted on rank 0, 1 on rank 1)
    return {
        "nll": torch.rand(5, generator=g) * 4,
        "counts": torch.tensor([3, 7, 1, 4, 2]),
        "maps": [torch.rand(2, c, 4, 4, generator=g) ** 4 for c in num_concepts],
        "images": _clip_images(5),
        "prompts": PROMPTS,
    }


def _metrics(clip_path: str) -> dict:
    return {
        "sample_nll": CaptionNLL("sample_mean"),
        "token_nll": CaptionNLL("token_mean"),
        "overlap": ConceptOverlap(),
        "clip": PromptCLIPScore(clip_path),
    }


def _update(metrics: dict, data: dict, start: int, stop: int) -> None:
    for i in range(start, stop):  # one sample per update: several updates per rank
        metrics["sample_nll"].update(data["nll"][i : i + 1], data["counts"][i : i + 1])
        metrics["token_nll"].update(data["nll"][i : i + 1], data["counts"][i : i + 1])
        metrics["overlap"].update(data["maps"][i : i + 1])
    metrics["clip"].update(data["images"][start:stop], data["prompts"][start:stop])


def _results(metrics: dict) -> dict:
    results = {name: metric.compute() for name, metric in metrics.items()}
    with metrics["overlap"].sync_context():  # compute() syncs the states only while it runs: sync them again
        results["skipped"] = metrics["overlap"].skipped.clone()
    return results


def _ddp_worker(rank: int, world_size: int, port: int, clip_path: str, out_dir: str) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        metrics = _metrics(clip_path)
        start = sum(SHARES[:rank])
        _update(metrics, _dataset(), start, start + SHARES[rank])
        torch.save(_results(metrics), Path(out_dir) / f"rank{rank}.pt")
        # Rank 0 hosts the TCP store: without this, it could tear its process group down while rank 1 still talks
        # to the store, and gloo's threads abort the process ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_reduction_equals_single_process_on_all_samples(tiny_paths, tmp_path):
    import torch.multiprocessing as mp

    data = _dataset()
    single = _metrics(tiny_paths["clip"])
    _update(single, data, 0, sum(SHARES))
    expected = _results(single)
    assert int(expected["skipped"]) == 1

    mp.spawn(_ddp_worker, args=(len(SHARES), _free_port(), tiny_paths["clip"], str(tmp_path)), nprocs=len(SHARES), join=True)
    for rank in range(len(SHARES)):
        assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected)

    # The reduction is by counts: a mean of the two ranks' means would be a different number.
    halves = [_metrics(tiny_paths["clip"]) for _ in SHARES]
    _update(halves[0], data, 0, SHARES[0])
    _update(halves[1], data, SHARES[0], sum(SHARES))
    for name in ("sample_nll", "token_nll", "overlap", "clip"):
        mean_of_means = (halves[0][name].compute() + halves[1][name].compute()) / 2
        assert not torch.allclose(mean_of_means, expected[name]), name
