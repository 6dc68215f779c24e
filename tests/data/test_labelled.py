"""Labelled data for the downstream tasks (:mod:`beit.data.labelled`): the seeded class-balanced subsets of
few-label training."""

from __future__ import annotations

import numpy as np

from beit.data.labelled import balanced_subset


def test_balanced_subset_is_balanced_and_seeded():
    targets = [0] * 10 + [1] * 7 + [2] * 3
    a = balanced_subset(targets, labels_per_class=4, seed=3)
    counts = np.bincount([targets[i] for i in a])
    assert counts.tolist() == [4, 4, 3]
    assert a == balanced_subset(targets, labels_per_class=4, seed=3)
    assert a != balanced_subset(targets, labels_per_class=4, seed=4)
    f = balanced_subset(targets, label_fraction=0.5, seed=0)
    assert np.bincount([targets[i] for i in f]).tolist() == [5, 4, 2]
