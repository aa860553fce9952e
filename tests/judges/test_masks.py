"""Mask providers: GroundedSAM on the tiny GroundingDINO + SAM (shapes, thresholds, matching, batching, frozen
state) and JsonlMasks (image files, uncompressed and compressed RLE, clear errors). Checks plumbing, not quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from comat_lightning.files.mask_files import rle_counts_to_string, rle_decode, rle_encode, rle_string_to_counts
from comat_lightning.judges.grounded_sam import GroundedSAMMasks, box_mask, detection_text, match_boxes
from comat_lightning.judges.masks import JsonlMasks, MaskProvider

PHRASES = [["cat", "dog", "bird"], ["bear"]]


def _provider(box_threshold: float, text_threshold: float) -> GroundedSAMMasks:
    return GroundedSAMMasks(
        "tiny://grounding-dino", "tiny://sam", box_threshold=box_threshold, text_threshold=text_threshold
    ).load()


@pytest.fixture(scope="module")
def provider() -> GroundedSAMMasks:
    return _provider(0.0, 0.7)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    # like a decoded image: nominally [0, 1], not clamped
    return torch.rand(2, 3, 64, 64, generator=generator) * 1.2 - 0.1


def _check_masks(masks, phrases, size=(64, 64)):
    assert [len(m) for m in masks] == [len(p) for p in phrases]
    for mask in (m for sample in masks for m in sample):
        assert mask is None or (mask.dtype == torch.float32 and mask.shape == size)
        if mask is not None:
            assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.any()


# ------------------------------------------------------------------------------------------------ tiny models


def test_tiny_detection_models_are_deterministic_and_load(tmp_path):
    from transformers import GroundingDinoForObjectDetection, SamModel

    from comat_lightning.tiny.detection_zoo import build_grounding_dino, build_sam

    for build, cls in ((build_grounding_dino, GroundingDinoForObjectDetection), (build_sam, SamModel)):
        build(tmp_path / "a")
        build(tmp_path / "b")
        weights = [(tmp_path / x / "model.safetensors").read_bytes() for x in "ab"]
        assert weights[0] == weights[1], build.__name__
        model = cls.from_pretrained(tmp_path / "a")
        assert sum(p.numel() for p in model.parameters()) < 500_000
        for x in "ab":
            for path in (tmp_path / x).iterdir():
                path.unlink()


# -------------------------------------------------------------------------------------------------- matching


def test_match_boxes_exact_phrase_highest_score():
    labels = ["cat dog", "cat", "dog", "cat", "Teddy  Bear", "bear"]
    scores = torch.tensor([0.99, 0.4, 0.5, 0.7, 0.3, 0.2])
    assert match_boxes(["cat", "dog", "teddy bear", "bird", "bear"], scores, labels) == [3, 2, 4, None, 5]
    assert match_boxes(["cat"], [0.9], ["cat dog"]) == [None]  # a box labelled with two phrases counts for none
    assert match_boxes(["cat"], [0.5, 0.5], ["cat", "cat"]) == [0]  # ties keep the first
    assert match_boxes(["", "cat"], [], []) == [None, None]
    with pytest.raises(ValueError, match="2 scores for 1 labels"):
        match_boxes(["cat"], [0.1, 0.2], ["cat"])


def test_detection_text_format():
    assert detection_text(["cat", " Teddy  Bear ", "cat", ""]) == "cat. teddy bear."
    assert detection_text([]) == ""


def test_box_mask():
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[1:3, 1:4] = True
    assert torch.equal(box_mask(torch.tensor([1.0, 1.0, 4.0, 3.0]), 4, 5), expected)


# ----------------------------------------------------------------------------------------------- GroundedSAM


def test_grounded_sam_shapes(provider, images):
    masks = provider(images, PHRASES, [{"prompt": "a"}, {"prompt": "b"}])
    _check_masks(masks, PHRASES)
    assert any(m is not None for sample in masks for m in sample)  # the tiny models at these thresholds find some
    assert provider(images, [[], []], [{}, {}]) == [[], []]
    with pytest.raises(ValueError, match="needs the generated images"):
        provider(None, PHRASES, [{}, {}])


def _expected_detections(provider, images, phrases, box_threshold, text_threshold):
    """Straight from the raw detector output: per phrase, the best score among queries with score > box_threshold
    whose tokens with probability > text_threshold decode exactly to the phrase."""
    from comat_lightning.judges.grounded_sam import to_pil_images

    processor = provider.detector_processor
    texts = [detection_text(p) for p in phrases]
    inputs = processor(images=to_pil_images(images), text=texts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        probs = provider.detector(**inputs).logits.sigmoid()  # (B, queries, max_text_len)
    expected = []
    for b, sample_phrases in enumerate(phrases):
        length = int(inputs["attention_mask"][b].sum())
        best: dict[str, float] = {}
        for query_probs in probs[b]:
            score = float(query_probs.max())
            if score <= box_threshold:
                continue
            token_ids = [int(inputs["input_ids"][b, t]) for t in range(1, length) if query_probs[t] > text_threshold]
            label = " ".join(processor.tokenizer.decode(token_ids).split())
            best[label] = max(best.get(label, 0.0), score)
        expected.append([best.get(p) for p in sample_phrases])
    return expected


def test_thresholds_against_raw_detector_output(images):
    provider = _provider(1.0, 0.5)
    assert all(m is None for sample in provider(images, PHRASES, [{}, {}]) for m in sample)  # sigmoid never > 1

    found = 0
    for box_threshold, text_threshold in [(0.0, 0.0), (0.0, 0.5), (0.0, 0.7), (0.6, 0.7), (0.0, 0.8), (0.75, 0.8)]:
        provider.box_threshold, provider.text_threshold = box_threshold, text_threshold
        detections = provider.detect(images, PHRASES)
        expected = _expected_detections(provider, images, PHRASES, box_threshold, text_threshold)
        for sample, sample_expected in zip(detections, expected):
            for detection, score in zip(sample, sample_expected):
                assert (detection is None) == (score is None), (box_threshold, text_threshold)
                if detection is not None:
                    assert detection.score >= box_threshold and detection.score == pytest.approx(score, abs=1e-6)
                    found += 1
    assert found >= 3  # not vacuous: several phrases are found at the lower thresholds


def test_threshold_options_are_validated():
    with pytest.raises(ValueError, match="box_threshold must be a number in \\[0, 1\\], got 1.5"):
        GroundedSAMMasks("tiny://grounding-dino", "tiny://sam", box_threshold=1.5)
    with pytest.raises(ValueError, match="text_threshold"):
        GroundedSAMMasks("tiny://grounding-dino", "tiny://sam", text_threshold=-0.1)


def test_models_load_lazily_and_an_unloadable_detector_names_the_option(tmp_path):
    provider = GroundedSAMMasks(str(tmp_path), "tiny://sam")  # a config names models without loading them
    assert provider.detector is None and provider.segmenter is None
    with pytest.raises(OSError, match="cannot load detector"):
        provider.load()


def test_batched_equals_one_sample_at_a_time(provider, images):
    records = [{"prompt": "a"}, {"prompt": "b"}]
    batched = provider(images, PHRASES, records)
    for b in range(2):
        alone = provider(images[b : b + 1], PHRASES[b : b + 1], records[b : b + 1])[0]
        for mask, single in zip(batched[b], alone):
            assert (mask is None) == (single is None)
            if mask is not None:
                assert torch.equal(mask, single)


def test_empty_sam_mask_falls_back_to_the_box(provider, images, monkeypatch):
    processor = provider.segmenter_processor
    original = processor.post_process_masks
    monkeypatch.setattr(processor, "post_process_masks", lambda *a, **k: [m & False for m in original(*a, **k)])
    detections = provider.detect(images, PHRASES)
    masks = provider.segment(images, detections)
    for sample, sample_masks in zip(detections, masks):
        for detection, mask in zip(sample, sample_masks):
            if detection is not None:
                assert torch.equal(mask, box_mask(detection.box, 64, 64).float())


def test_frozen_and_always_in_eval_mode(provider):
    holder = nn.ModuleDict({"masks": provider, "head": nn.Linear(2, 2)})
    holder.train()
    assert holder["head"].training
    assert not any(m.training for m in provider.modules())
    assert not any(p.requires_grad for p in provider.parameters())
    assert sum(p.numel() for p in provider.parameters()) > 0


# ------------------------------------------------------------------------------------------------------ RLE

# Hand-built 3x4 mask; column-major walk: 0 0 0 | 1 1 0 | 0 1 1 | 0 0 0 -> runs 3 zeros, 2 ones, 2, 2, 3.
HAND_MASK = np.array([[0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]], dtype=bool)
HAND_COUNTS = [3, 2, 2, 2, 3]
# Compressed: runs 0-2 as is ("3", "2", "2"), then differences to the run two before: 2-2=0 -> "0", 3-2=1 -> "1".
HAND_STRING = "32201"


def test_rle_decoders_on_hand_built_masks():
    assert np.array_equal(rle_decode({"size": [3, 4], "counts": HAND_COUNTS}), HAND_MASK)
    assert np.array_equal(rle_decode({"size": [3, 4], "counts": HAND_STRING}), HAND_MASK)
    # a mask starting with a 1 starts with an empty zero-run
    assert np.array_equal(rle_decode({"size": [2, 2], "counts": [0, 1, 1, 1, 1]}), [[1, 1], [0, 0]])
    # multi-character and negative differences: 40 = 8 + 1*32 -> "X1"; 1-2 = -1 -> "O" (sign bit set)
    assert rle_string_to_counts("X153") == [40, 5, 3]
    assert rle_string_to_counts("521O") == [5, 2, 1, 1]
    assert rle_counts_to_string([40, 5, 3]) == "X153" and rle_counts_to_string([5, 2, 1, 1]) == "521O"
    assert rle_counts_to_string(HAND_COUNTS) == HAND_STRING


def test_rle_round_trip():
    generator = np.random.default_rng(0)
    for shape in [(1, 1), (5, 7), (33, 17)]:
        mask = generator.random(shape) < 0.3
        for compress in (False, True):
            assert np.array_equal(rle_decode(rle_encode(mask, compress=compress)), mask)
    assert rle_encode(HAND_MASK) == {"size": [3, 4], "counts": HAND_COUNTS}
    assert rle_encode(torch.from_numpy(HAND_MASK), compress=True)["counts"] == HAND_STRING


# ------------------------------------------------------------------------------------------------ JsonlMasks


def test_jsonl_masks_from_files_and_rle(tmp_path):
    from PIL import Image

    (tmp_path / "masks").mkdir()
    png = np.zeros((6, 5), dtype=np.uint8)
    png[2:5, 1:3] = 255
    Image.fromarray(png).save(tmp_path / "masks" / "cat.png")
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[0, 3] = (0, 7, 0)  # any nonzero colour channel is inside
    Image.fromarray(rgb).save(tmp_path / "masks" / "dog.png")
    record = {
        "prompt": "a cat, a dog, a bear and a bird",
        "masks": {
            "cat": "masks/cat.png",
            "Dog": str(tmp_path / "masks" / "dog.png"),  # absolute path; keys compare lower-cased
            "bear": {"size": [3, 4], "counts": HAND_COUNTS},
            "bird": {"size": [3, 4], "counts": HAND_STRING},
        },
    }
    provider = JsonlMasks(root=str(tmp_path))
    assert isinstance(provider, MaskProvider) and provider.needs_images is False
    masks = provider(None, [["cat", "dog", "bear", "bird", "tree"], ["cat"]], [record, {"prompt": "no masks"}])
    cat, dog, bear, bird, tree = masks[0]
    assert cat.dtype == torch.float32 and torch.equal(cat, torch.from_numpy(png != 0).float())
    assert torch.equal(dog, torch.from_numpy((rgb != 0).any(-1)).float())
    assert torch.equal(bear, torch.from_numpy(HAND_MASK).float()) and torch.equal(bird, bear)
    assert tree is None and masks[1] == [None]  # missing phrase, record without the field


def test_jsonl_masks_errors_name_prompt_and_phrase(tmp_path):
    (tmp_path / "not_an_image.png").write_text("hello")
    provider = JsonlMasks(field="seg", root=str(tmp_path))
    bad = {
        "missing": "nowhere.png",
        "garbage": "not_an_image.png",
        "short": {"size": [3, 4], "counts": [3, 2]},
        "badchar": {"size": [3, 4], "counts": "32 01"},
        "nosize": {"counts": [12]},
        "number": 7,
    }
    problems = {
        "missing": "does not exist",
        "garbage": "cannot read mask file",
        "short": "sum to 5, but 'size' 3x4 has 12 pixels",
        "badchar": "invalid character",
        "nosize": "must be a dict with 'size' and 'counts'",
        "number": "must be an image path or an RLE dict",
    }
    record = {"prompt": "a red car", "seg": bad}
    for phrase, problem in problems.items():
        with pytest.raises(ValueError, match=f"'a red car', phrase '{phrase}' \\(field 'seg'\\).*{problem}"):
            provider(None, [[phrase]], [record])
    with pytest.raises(ValueError, match="'a red car': field 'seg' must map phrases to masks"):
        provider(None, [["car"]], [{"prompt": "a red car", "seg": ["car.png"]}])


def test_jsonl_masks_follow_the_images_device_and_stay_eval():
    provider = JsonlMasks()
    provider.train()
    assert not provider.training
    record = {"prompt": "p", "masks": {"cat": {"size": [3, 4], "counts": HAND_COUNTS}}}
    (mask,) = provider(torch.zeros(1, 3, 8, 8, device="meta"), [["cat"]], [record])[0]
    assert mask.device.type == "meta"
