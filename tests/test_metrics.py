import numpy as np

from runner.metrics import Accuracy, hit_ranks, topk_indices

GUIDE_RESULT = (
    '{"title": "Overall statistical evaluation", "value": [{"key": "Number of images", "value":'
    ' "50000"}, {"key": "Number of classes", "value": "1000"}, {"key": "Top1 accuracy", "value":'
    ' "77.57%"}, {"key": "Top2 accuracy", "value": "87.3%"}, {"key": "Top3 accuracy", "value":'
    ' "90.57%"}, {"key": "Top4 accuracy", "value": "92.34%"}, {"key": "Top5 accuracy", "value":'
    ' "93.46%"}]}'
)


def test_result_json_matches_the_guides_example_byte_for_byte():
    # Hit counts per rank that give the guide's published cumulative shares.
    hits = [38785, 4865, 1635, 885, 560]
    ranks = np.concatenate([np.full(h, r) for r, h in enumerate(hits)] +
                           [np.full(50000 - sum(hits), -1)])
    acc = Accuracy.from_ranks(ranks, 1000)
    assert acc.to_guide_json() == GUIDE_RESULT


def test_topk_is_descending_argsort():
    logits = np.array([[0.1, 3.0, -1.0, 2.0, 0.5, 7.0, 0.0]], dtype=np.float32)
    assert topk_indices(logits).tolist() == [[5, 1, 3, 4, 0]]
    rng = np.random.default_rng(1)
    many = rng.standard_normal((50, 1000)).astype(np.float32)
    for row, top in zip(many, topk_indices(many), strict=True):
        assert top.tolist() == np.argsort(-row)[:5].tolist()


def test_hit_ranks_and_cumulative_accuracy():
    top = np.array([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5], [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    labels = np.array([1, 5, 7, 0])
    ranks = hit_ranks(top, labels, 1000)
    assert ranks.tolist() == [0, 4, -1, -1]
    acc = Accuracy.from_ranks(ranks, 1000)
    assert acc.topk == (0.25, 0.25, 0.25, 0.25, 0.5)
    # 1001-way outputs: background at 0, so label c sits at index c + 1.
    assert hit_ranks(top, labels - 1, 1001).tolist() == [0, 4, -1, -1]


def test_equal_top_logits_rank_by_class_index_whatever_the_row():
    # INT8 models dequantize to few values: exact ties on top happen (2 of 1,300 val_227
    # images with Lite0 INT8). numpy's default argsort put the higher index first in about
    # half of such 1000-class rows; the ranking must not depend on the sort's internals.
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((200, 1000)).astype(np.float32)
    tied = np.sort(np.stack([rng.choice(1000, 3, replace=False) for _ in range(200)]), axis=1)
    logits[np.arange(200)[:, None], tied] = 5.0
    top = topk_indices(logits, k=5)
    assert np.array_equal(top[:, :3], tied)
    assert (np.diff(np.take_along_axis(logits, top, axis=1), axis=1) <= 0).all()
