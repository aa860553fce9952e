"""GenEval's judges (comat_lightning/evaluation/geneval_judges.py) on the tiny random models: the real
transformers paths run and return what the rules need."""

from __future__ import annotations

import numpy as np

from comat_lightning.evaluation.geneval import COLOURS, OBJECT_NAMES, Detection


def test_instances_come_back_with_geneval_names_boxes_and_masks():
    from comat_lightning.evaluation.geneval_judges import InstanceSegmenter

    segmenter = InstanceSegmenter("tiny://mask2former", threshold=0.0)  # random weights: keep every instance
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    found = segmenter.detect(image)
    assert found and all(d.cls in OBJECT_NAMES for d in found)  # the 80 classes map to GenEval's names by index
    for d in found:
        x0, y0, x1, y1 = d.box
        assert d.mask.shape == (48, 64) and d.mask.dtype == bool and 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48
        ys, xs = np.nonzero(d.mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == d.box  # the box bounds the mask


def test_colour_is_one_of_genevals_ten_and_ignores_pixels_outside_the_mask():
    from comat_lightning.evaluation.geneval_judges import ColourClassifier

    classifier = ColourClassifier("tiny://clip")
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    detection = Detection("car", 0.9, (4.0, 4.0, 28.0, 28.0), mask)
    image = np.zeros((32, 32, 3), np.uint8)
    image[mask] = (200, 30, 30)
    colour = classifier.colour(image, detection)
    assert colour in COLOURS
    noisy = image.copy()
    noisy[~mask] = np.random.default_rng(1).integers(0, 256, (int((~mask).sum()), 3))  # outside the mask: grey #999
    assert classifier.colour(noisy, detection) == colour
