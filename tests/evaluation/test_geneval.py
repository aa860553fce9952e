"""GenEval's rules (comat_lightning/evaluation/geneval.py) on hand-made detections with hand-computed results."""

from __future__ import annotations

import json

import pytest

from comat_lightning.errors import InputError
from comat_lightning.evaluation.geneval import (
    Clause,
    Detection,
    Prompt,
    colour_prompts,
    judge,
    kept_detections,
    read_metadata,
    relations,
    summarise,
)


def _det(cls, score, box=(0, 0, 10, 10), colour=None):
    return Detection(cls, score, box, mask=colour)


def _colour(d):
    return d.mask  # the tests carry each object's colour in its mask slot


def test_relative_position_shrinks_offsets_by_the_boxes_sizes():
    a, b = (0, 0, 10, 10), (20, 0, 30, 10)  # offset -20 on x, shrunk by 0.1 * (10 + 10) = 2 -> -18 / 20 = -0.9
    assert relations(a, b) == {"left of"} and relations(b, a) == {"right of"}
    assert relations((0, 0, 10, 10), (1, 0, 11, 10)) == set()  # offset 1 < shrink 2: no relation
    assert relations((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}  # -18 / 28.28 = -0.64 on both axes
    assert relations((0, 0, 10, 10), (20, 5, 30, 15)) == {"left of"}  # dy: -5 + 2 = -3 -> -3 / 20.6 = -0.15


def test_detections_kept_by_threshold_and_at_most_16_per_class():
    dets = [_det("cat", s) for s in (0.95, 0.5, 0.31, 0.3)] + [_det("dog", 0.99)] * 20
    kept = kept_detections(dets, "two_object")
    assert [d.score for d in kept["cat"]] == [0.95, 0.5, 0.31] and len(kept["dog"]) == 16  # > 0.3, strictly
    assert [d.score for d in kept_detections(dets, "counting")["cat"]] == [0.95]  # counting: > 0.9 for every class


def test_counting_asks_for_exactly_n():
    prompt = Prompt("counting", "a photo of two clocks", (Clause("clock", 2),), (Clause("clock", 3),))
    assert judge(prompt, [_det("clock", 0.95), _det("clock", 0.92), _det("clock", 0.6)], _colour) == (True, "")
    ok, why = judge(prompt, [_det("clock", 0.95), _det("clock", 0.92), _det("clock", 0.91)], _colour)
    assert not ok and why == "expected clock < 3, found 3"
    ok, why = judge(prompt, [_det("clock", 0.95), _det("clock", 0.8)], _colour)
    assert not ok and why == "expected clock >= 2, found 1"


def test_colour_clauses_check_the_top_count_objects():
    prompt = Prompt("color_attr", "a photo of a red car and a blue bench", (Clause("car", 1, "red"), Clause("bench", 1, "blue")))
    good = [_det("car", 0.8, colour="red"), _det("car", 0.5, colour="green"), _det("bench", 0.7, colour="blue")]
    assert judge(prompt, good, _colour)[0]  # only the best car is checked
    swapped = [_det("car", 0.8, colour="blue"), _det("bench", 0.7, colour="red")]
    assert judge(prompt, swapped, _colour) == (False, "expected red car, found blue")


def test_position_needs_every_object_in_relation_to_every_target():
    prompt = Prompt("position", "a photo of a dog right of a teddy bear", (Clause("teddy bear"), Clause("dog", 1, position=("right of", 0))))
    assert judge(prompt, [_det("teddy bear", 0.9, (0, 0, 10, 10)), _det("dog", 0.9, (20, 0, 30, 10))], _colour)[0]
    ok, why = judge(prompt, [_det("teddy bear", 0.9, (20, 0, 30, 10)), _det("dog", 0.9, (0, 0, 10, 10))], _colour)
    assert not ok and why == "expected dog right of teddy bear"
    assert not judge(prompt, [_det("dog", 0.9, (20, 0, 30, 10))], _colour)[0]  # no target: the clause fails too


def test_overall_is_the_mean_of_the_tag_scores():
    result = summarise([("single_object", True), ("single_object", True), ("counting", False), ("counting", True), ("counting", True), ("counting", False)])
    assert result["tags"] == {"single_object": 1.0, "counting": 0.5}
    assert result["images"] == {"single_object": 2, "counting": 4}
    assert result["overall"] == 0.75  # not 4 / 6: tags weigh the same


def test_metadata_is_read_and_bad_lines_name_file_and_line(tmp_path):
    good = {"tag": "position", "prompt": "a photo of a dog right of a teddy bear",
            "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]}  # fmt: skip
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text(json.dumps(good) + "\n")
    assert read_metadata(path) == [Prompt("position", good["prompt"], (Clause("teddy bear"), Clause("dog", 1, None, ("right of", 0))))]
    bad_lines = {
        "{not json": "not a JSON object",
        json.dumps({**good, "tag": "colour"}): "a \"tag\"",
        json.dumps({**good, "include": [{"class": "car", "color": "teal"}]}): "unknown color 'teal'",
        json.dumps({**good, "include": [{"class": "dog", "position": ["behind", 0]}]}): "\"position\" must be",
        json.dumps({**good, "include": [{"class": "dog", "count": 0}]}): "positive integer",
    }
    for line, message in bad_lines.items():
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(InputError, match=message) as err:
            read_metadata(path)
        assert str(err.value).startswith(f"{path}:2:")


def test_colour_prompts_are_the_three_templates_for_ten_colours():
    texts = colour_prompts("car")
    assert list(texts) == ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
    assert texts["red"] == ["a photo of a red car", "a photo of a red-colored car", "a photo of a red object"]
