"""MultiTaskDataset, MultiDigits, the synthetic conflict generator and build_dataset's option checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from dist_mtl.data import BINARY_TASK_NAMES, DATASET_NAMES, MultiTaskDataset, TaskSpec, build_dataset
from dist_mtl.data.multidigits import BINARY_RELATIONS, compose_multidigits
from dist_mtl.data.synthetic import make_synthetic_problem
from dist_mtl.errors import ConfigError

SMALL = {"train_size": 600, "test_size": 200}


def test_dataset_length_shape_and_label_range_check():
    data = MultiTaskDataset(
        torch.zeros(5, 1, 8, 16), torch.zeros(5, 2, dtype=torch.int64), (TaskSpec("a", 2),) * 2
    )
    assert len(data) == 5 and data.input_shape == (1, 8, 16)
    with pytest.raises(ValueError, match="task 'b'.*\\[0, 3\\)"):
        MultiTaskDataset(
            torch.zeros(2, 4), torch.tensor([[0, 0], [1, 3]]), (TaskSpec("a", 2), TaskSpec("b", 3))
        )
    with pytest.raises(ValueError, match="3 columns but 2 tasks"):
        MultiTaskDataset(torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.int64), (TaskSpec("a", 2),) * 2)


def test_multidigits_pair_shapes_normalisation_and_determinism():
    train, test = build_dataset("multidigits", seed=3, **SMALL)
    assert train.x.shape == (600, 1, 8, 16) and test.x.shape == (200, 1, 8, 16)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert [t.name for t in train.tasks] == ["left", "right"] and {t.num_classes for t in train.tasks} == {10}
    assert abs(train.x.mean().item()) < 1e-4 and abs(train.x.std().item() - 1) < 1e-3
    again, _ = build_dataset("multidigits", seed=3, **SMALL)
    other, _ = build_dataset("multidigits", seed=4, **SMALL)
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y)
    assert not torch.equal(train.x, other.x)


def _halves(pairs) -> tuple[set[bytes], list[bytes], list[bytes]]:
    left = [c[0, :, :8].tobytes() for c in pairs.canvases]
    right = [c[0, :, 8:].tobytes() for c in pairs.canvases]
    return set(left) | set(right), left, right


def test_multidigits_no_test_source_digit_in_training_and_labels_match_pixels():
    train, test = compose_multidigits(seed=0, train_size=3000, test_size=800, test_fraction=0.2)
    train_sources = set(train.left_source) | set(train.right_source)
    test_sources = set(test.left_source) | set(test.right_source)
    assert not train_sources & test_sources
    train_pixels, _, _ = _halves(train)
    test_pixels, _, _ = _halves(test)
    assert not train_pixels & test_pixels  # load_digits has no duplicate images, so this is the real check
    digits = load_digits()
    label_of = {
        (img / 16.0).astype(np.float32).tobytes(): int(t)
        for img, t in zip(digits.images, digits.target, strict=True)
    }
    _, left, right = _halves(test)
    assert [label_of[p] for p in left] == test.left_digit.tolist()
    assert [label_of[p] for p in right] == test.right_digit.tolist()
    built_train, built_test = build_dataset("multidigits", seed=0, train_size=3000, test_size=800)
    both_halves = {h.tobytes() for x in built_train.x.numpy() for h in (x[..., :8], x[..., 8:])}
    assert not any(h.tobytes() in both_halves for x in built_test.x.numpy() for h in (x[..., :8], x[..., 8:]))


def test_multidigits_split_is_stratified_by_fraction():
    train, test = compose_multidigits(seed=1, train_size=4000, test_size=4000, test_fraction=0.2)
    n_test_sources = len(set(test.left_source) | set(test.right_source))
    assert 330 <= n_test_sources <= 365  # about 20% of 1,797, every class represented
    assert set(np.unique(test.left_digit)) == set(range(10))


def test_multidigits_binary_tasks_follow_their_rules():
    assert len(BINARY_TASK_NAMES) >= 40 and len(set(BINARY_TASK_NAMES)) == len(BINARY_TASK_NAMES)
    pair, _ = build_dataset("multidigits", seed=2, **SMALL)
    binary, _ = build_dataset("multidigits", seed=2, tasks="binary", **SMALL)
    assert torch.equal(pair.x, binary.x)
    assert [t.name for t in binary.tasks] == list(BINARY_TASK_NAMES)
    left, right = pair.y[:, 0], pair.y[:, 1]
    column = {t.name: binary.y[:, i] for i, t in enumerate(binary.tasks)}
    assert torch.equal(column["left_is_3"], (left == 3).long())
    assert torch.equal(column["right_is_7"], (right == 7).long())
    assert torch.equal(column["left_gt_right"], (left > right).long())
    assert torch.equal(column["sum_mod_3_is_0"], ((left + right) % 3 == 0).long())
    assert torch.equal(column["right_is_prime"], torch.isin(right, torch.tensor([2, 3, 5, 7])).long())
    for i, (name, rule) in enumerate(BINARY_RELATIONS):
        expected = torch.from_numpy(rule(left.numpy(), right.numpy()).astype(np.int64))
        assert torch.equal(binary.y[:, i], expected), name
    assert ((binary.y == 0) | (binary.y == 1)).all()


def test_multidigits_binary_num_tasks_takes_a_prefix_and_names_the_maximum():
    first, _ = build_dataset("multidigits", seed=2, tasks="binary", num_tasks=5, **SMALL)
    assert [t.name for t in first.tasks] == list(BINARY_TASK_NAMES[:5]) and first.y.shape == (600, 5)
    available = len(BINARY_TASK_NAMES)
    with pytest.raises(
        ConfigError,
        match="^data.num_tasks: multidigits with tasks 'binary': "
        f"expected an integer in \\[1, {available}\\], got 50$",
    ):
        build_dataset("multidigits", seed=0, tasks="binary", num_tasks=50)


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_multidigits_pair_rejects_num_tasks_instead_of_ignoring_it(num_tasks):
    with pytest.raises(
        ConfigError,
        match=f"^data.num_tasks: multidigits with tasks 'pair' always has 2 tasks .*num_tasks={num_tasks}; "
        "num_tasks applies only to tasks 'binary' \\(1..43\\)",
    ):
        build_dataset("multidigits", seed=0, num_tasks=num_tasks)


def _cosines(w: np.ndarray) -> np.ndarray:
    return w @ w.T


def test_synthetic_plants_conflicting_cluster_pairs():
    problem = make_synthetic_problem(
        seed=0, num_tasks=40, input_dim=32, num_clusters=4, conflict=0.8, spread=0.5, label_noise=0.1
    )
    cos, clusters = _cosines(problem.directions), problem.clusters
    assert np.allclose(np.diag(cos), 1.0)
    assert list(np.bincount(clusters)) == [10] * 4 and np.all(np.diff(clusters) >= 0)
    for a in range(4):
        members = clusters == a
        within = cos[np.ix_(members, members)][~np.eye(members.sum(), dtype=bool)]
        partner = clusters == problem.partner(a)
        across = cos[np.ix_(members, partner)]
        assert within.mean() > 0.6
        assert across.mean() < -0.4  # planted: about -conflict / (1 + spread^2) = -0.64
    unrelated = cos[np.ix_(clusters == 0, clusters == 2)]
    assert abs(unrelated.mean()) < 0.35


def test_synthetic_conflict_shows_in_labels_and_labels_are_learnable():
    train, test = build_dataset(
        "synthetic", seed=5, num_tasks=8, input_dim=16, num_clusters=2, train_size=2000, test_size=1000
    )
    assert (
        train.x.shape == (2000, 16)
        and train.y.shape == (2000, 8)
        and {t.num_classes for t in train.tasks} == {2}
    )
    corr = np.corrcoef(train.y.numpy().T.astype(float))
    assert corr[:4, 4:].mean() < -0.3 and corr[:4, :4].mean() > 0.5
    design = torch.cat([train.x, torch.ones(2000, 1)], dim=1).double()
    weights = torch.linalg.lstsq(design, (2.0 * train.y - 1).double()).solution
    predictions = (torch.cat([test.x, torch.ones(1000, 1)], dim=1).double() @ weights) > 0
    accuracy = (predictions.long() == test.y).double().mean(dim=0)
    assert accuracy.min() > 0.85  # chance is about 0.5


def test_synthetic_is_deterministic_and_scales_to_1000_tasks():
    a, _ = build_dataset("synthetic", seed=9, num_tasks=1000, train_size=300, test_size=10)
    b, _ = build_dataset("synthetic", seed=9, num_tasks=1000, train_size=300, test_size=10)
    assert a.y.shape == (300, 1000) and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.tasks[0].name == "task_000" and a.tasks[-1].name == "task_999"
    c, _ = build_dataset("synthetic", seed=10, num_tasks=1000, train_size=300, test_size=10)
    assert not torch.equal(a.y, c.y)


def test_build_dataset_rejects_unknown_names_and_options():
    with pytest.raises(
        ConfigError,
        match="data.name: unknown data set 'mnist'; valid: multidigits, synthetic, celeba, shards",
    ):
        build_dataset("mnist", seed=0)
    with pytest.raises(
        ConfigError, match="data.input_dim: not an option of multidigits; valid options: train_size"
    ):
        build_dataset("multidigits", seed=0, input_dim=3)
    with pytest.raises(ConfigError, match="data.tasks: expected one of 'pair', 'binary', got 'triple'"):
        build_dataset("multidigits", seed=0, tasks="triple")
    with pytest.raises(ConfigError, match="data.train_size: expected an integer >= 1, got '100'"):
        build_dataset("synthetic", seed=0, train_size="100")
    with pytest.raises(ConfigError, match="data.num_clusters: expected an integer in \\[1, 4\\], got 5"):
        build_dataset("synthetic", seed=0, num_tasks=4, num_clusters=5)
    with pytest.raises(ConfigError, match="data.conflict: expected a number in \\[0.0, 1.0\\], got 1.5"):
        build_dataset("synthetic", seed=0, conflict=1.5)
    with pytest.raises(ConfigError, match="seed: expected a non-negative integer"):
        build_dataset("synthetic", seed=-1)
    assert DATASET_NAMES == ("multidigits", "synthetic", "celeba", "shards")
