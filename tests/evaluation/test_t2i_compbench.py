"""T2I-CompBench's rules (comat_lightning/evaluation/t2i_compbench.py) on hand-made inputs with hand-computed
scores; the prompt parsing runs the real spaCy pipeline."""

from __future__ import annotations

import math

import pytest

from comat_lightning.evaluation.t2i_compbench import (
    Box,
    attribute_binding_score,
    clean_question,
    complex_score,
    noun_chunk_questions,
    position_score,
    relation_of,
    spatial_objects,
    spatial_score,
    without_adjectives,
    yes_probability,
)


@pytest.fixture(scope="module")
def nlp():
    from comat_lightning.text.entities import EntityParser

    return EntityParser().nlp


def test_every_noun_chunk_becomes_a_lowercase_question(nlp):
    assert noun_chunk_questions("A green bench and a blue bowl", nlp) == ["a green bench?", "a blue bowl?"]
    assert clean_question('A "red" car (big)!?') == "a red car big?"  # deleted: . ! " ( ) * # : ; ~, kept: ?


def test_chunks_the_official_script_drops(nlp):
    questions = noun_chunk_questions("a dog on the left of a cat", nlp)
    assert "the left?" not in questions and questions == ["a dog?", "a cat?"]


def test_yes_probability_and_the_product_rule():
    assert yes_probability(2.0, 0.0) == pytest.approx(1 / (1 + math.exp(-2.0)))  # 0.880797
    # each factor rounded to 4 decimals first: 0.8808 * 0.5 = 0.4404
    assert attribute_binding_score([yes_probability(2.0, 0.0), 0.5]) == 0.4404
    assert attribute_binding_score([]) == 1.0  # no noun chunk: every question slot is 1


def test_relations_are_found_in_the_official_order():
    assert relation_of("a cat on the left of a dog") == "on the left of"
    assert relation_of("a lamp next to a bed near a wall") == "next to"  # "next to" is searched before "near"
    assert relation_of("a cup on top of a table") == "on top of"
    assert relation_of("a cat and a dog") is None


def test_position_rules_on_box_centres():
    left, right = Box(0, 0, 100, 100), Box(200, 0, 300, 100)
    assert position_score("on the left of", left, right) == 1.0
    assert position_score("on the right of", left, right) == 0.0  # dx > 0: left of, not right of
    assert position_score("on the right of", right, left) == 1.0
    overlapping = Box(50, 0, 150, 100)  # IoU 5000 / 15000 = 1/3 -> 0.1 / (1/3) = 0.3
    assert position_score("on the left of", left, overlapping) == pytest.approx(0.3)
    top, below = Box(0, 0, 100, 100), Box(0, 300, 100, 400)
    assert position_score("on the top of", top, below) == 1.0 and position_score("on the bottom of", below, top) == 1.0
    far = Box(300, 300, 400, 400)  # centres 300 apart on both axes: 150 / 300
    assert position_score("near", left, far) == 0.5
    assert position_score("next to", left, Box(100, 300, 200, 400)) == 1.0  # |dx| = 100 < 150 on one axis suffices
    assert position_score("on top of", top, below) == 0.0  # the official rules have no case for it


def test_spatial_score_combines_confidences_and_position(nlp):
    prompt = "a cat on the left of a dog"
    assert spatial_objects(prompt, nlp) == ("cat", "dog")
    assert spatial_objects("a girl on the left of a chair", nlp) == ("person", "chair")
    detections = [("cat", Box(0, 0, 100, 100, 0.9)), ("dog", Box(300, 0, 400, 100, 0.8)), ("cat", Box(300, 300, 400, 400, 0.6))]
    assert spatial_score(prompt, nlp, detections, image_size=479) == pytest.approx(0.25 * 0.9 + 0.25 * 0.8 + 0.5)
    # the wrong way round: position 0, 0.425 < 0.5 -> 0
    assert spatial_score("a dog on the left of a cat", nlp, detections, image_size=479) == 0.0
    assert spatial_score(prompt, nlp, detections[:1], image_size=479) == 0.0  # one object: 0.225 -> 0
    # pixel thresholds live in the 479-px frame: at 958 px the same layout is scaled by 1/2
    near = [("cat", Box(0, 0, 200, 200, 1.0)), ("dog", Box(400, 400, 600, 600, 1.0))]  # 400 px apart = 200 in the frame
    assert spatial_score("a cat near a dog", nlp, near, image_size=958) == pytest.approx(0.5 + 0.5 * 150 / 200)
    assert spatial_score("a cat near a dog", nlp, near, image_size=479) == pytest.approx(0.5 + 0.5 * 150 / 400)


def test_complex_rule_and_action_text(nlp):
    assert complex_score(0.6, spatial=0.8) == pytest.approx(0.7)
    assert complex_score(0.6, action=0.3) == pytest.approx(0.45)
    assert complex_score(0.6, spatial=0.8, action=0.4) == pytest.approx(0.6)
    assert without_adjectives("a red cat chasing a small dog", nlp) == "a cat chasing a dog"


def test_complex_prompts_take_the_objects_around_the_relation_phrase(nlp):
    from comat_lightning.evaluation.t2i_compbench import complex_spatial_objects

    assert complex_spatial_objects("The fluffy cat was lying on the left of the old red sofa", nlp) == ("cat", "sofa")
    assert complex_spatial_objects("a woman sitting next to a wooden table", nlp) == ("person", "table")
    assert complex_spatial_objects("a red car and a blue bus", nlp) == (None, None)
