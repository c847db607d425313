import numpy as np
import pytest

from qcal.data import fashion_mnist
from qcal.data.cache import BatchCache, iter_batches
from qcal.data.plan import Selection, check_disjoint, plan_data
from qcal.data.preprocessing import Preprocessing
from qcal.data.sources import FashionMNISTSource, ImageFolderSource, RecordIOSource, open_source
from qcal.errors import QcalError, UsageProblem

SMALL = Preprocessing(input_size=32, crop_ratio=0.875)


def reference_preprocess(path_or_bytes, pre):
    """gluoncv's evaluation transform, written out with MXNet's image ops (independent path)."""
    import mxnet as mx

    raw = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    img = mx.image.imdecode(raw)
    img = mx.image.resize_short(img, pre.resize_to, interp=1)  # bilinear, as gluoncv
    img, _ = mx.image.center_crop(img, (pre.input_size, pre.input_size))
    x = img.astype("float32").asnumpy() / 255.0
    x = (x - np.array(pre.mean)) / np.array(pre.std)
    return x.transpose(2, 0, 1).astype(np.float32)


class TestImageFolder:
    def test_order_is_by_file_name_across_classes(self, imagenet_folder):
        root, layout = imagenet_folder
        source = ImageFolderSource(root, SMALL)
        assert [f.name for f in source.files] == [f"ILSVRC2012_val_{n:08d}.JPEG"
                                                  for n in sorted(layout)]
        assert source.labels.tolist() == [int(layout[n]) for n in sorted(layout)]

    def test_preprocessing_is_resize_short_then_centre_crop(self, imagenet_folder):
        root, _ = imagenet_folder
        source = ImageFolderSource(root, SMALL)
        batch = source.decode([0, 5])
        assert batch.shape == (2, 3, 32, 32) and batch.dtype == np.float32
        expected = reference_preprocess(source.files[5], SMALL)
        np.testing.assert_allclose(batch[1], expected, atol=1e-5)
        assert SMALL.resize_to == 37  # ceil(32 / 0.875)

    def test_any_class_names_are_numbered_as_gluon_and_torchvision_do(self, tmp_path):
        from mxnet.gluon.data.vision import ImageFolderDataset

        from tests.fixtures import write_jpeg

        layout = {"a1.jpg": "dog", "a2.jpg": "cat", "a3.jpg": "Zebra", "a4.jpg": "cat",
                  "a5.jpg": "bird_2", "a6.jpg": "10"}
        for i, (name, folder) in enumerate(layout.items()):
            write_jpeg(tmp_path / folder / name, np.random.RandomState(i))
        source = ImageFolderSource(tmp_path, SMALL)
        gluon = ImageFolderDataset(str(tmp_path))  # MXNet's own numbering of the same folders
        expected = [gluon.synsets.index(layout[f.name]) for f in source.files]
        assert source.labels.tolist() == expected
        assert source.class_names == {"10": 0, "Zebra": 1, "bird_2": 2, "cat": 3, "dog": 4}

    def test_numbered_and_synset_folders_keep_their_indices(self, tmp_path):
        from tests.fixtures import write_jpeg

        for i, folder in enumerate(["3", "12", "unlabelled"]):
            write_jpeg(tmp_path / "numbers" / folder / f"p{i}.jpg", np.random.RandomState(i))
        for i, folder in enumerate(["n01440764", "n15075141"]):  # first and last ImageNet class
            write_jpeg(tmp_path / "synsets" / folder / f"p{i}.jpg", np.random.RandomState(i))
        assert ImageFolderSource(tmp_path / "numbers", SMALL).labels.tolist() == [3, 12, -1]
        assert ImageFolderSource(tmp_path / "synsets", SMALL).labels.tolist() == [0, 999]

    def test_a_labels_file_numbers_the_folders(self, tmp_path):
        from tests.fixtures import write_jpeg

        for i, folder in enumerate(["T-shirt", "Trouser", "Ankle boot"]):
            write_jpeg(tmp_path / folder / f"p{i}.jpg", np.random.RandomState(i))
        (tmp_path / "labels.txt").write_text("T-shirt\nTrouser\nPullover\nAnkle boot\n")
        assert ImageFolderSource(tmp_path, SMALL).labels.tolist() == [0, 1, 3]
        (tmp_path / "labels.txt").write_text("T-shirt\nAnkle boot\n")
        with pytest.raises(QcalError, match="labels.txt does not list the class folder 'Trouser'"):
            ImageFolderSource(tmp_path, SMALL)

    def test_images_without_class_folders_are_refused_with_the_layout(self, tmp_path):
        from tests.fixtures import write_jpeg

        write_jpeg(tmp_path / "a.jpg", np.random.RandomState(0))
        with pytest.raises(QcalError, match="holds images but no class folders: put each class's"):
            ImageFolderSource(tmp_path)

    def test_empty_folder_is_refused(self, tmp_path):
        (tmp_path / "n01440764").mkdir()
        with pytest.raises(QcalError, match="has no images"):
            ImageFolderSource(tmp_path)


class TestRecordIO:
    def test_labels_and_images_in_index_order(self, recordio_file):
        rec, labels = recordio_file
        source = RecordIOSource(rec, SMALL)
        assert source.labels.tolist() == labels
        batch = source.decode([2, 3])
        assert batch.shape == (2, 3, 32, 32)

    def test_missing_idx_is_named(self, recordio_file):
        rec, _ = recordio_file
        rec.with_suffix(".idx").unlink()
        with pytest.raises(QcalError, match=r"val\.idx"):
            RecordIOSource(rec, SMALL)


class TestFashionMNIST:
    def test_vendored_splits(self):
        test = FashionMNISTSource("t10k")
        calib = FashionMNISTSource("calib")
        assert len(test) == 10000 and len(calib) == 2000
        assert np.bincount(test.labels).tolist() == [1000] * 10
        x = test.decode([0, 1])
        assert x.shape == (2, 1, 32, 32)
        # the zero-padded border holds the normalised value of a black pixel
        np.testing.assert_allclose(x[0, 0, 0, 0], -fashion_mnist.PIXEL_MEAN / fashion_mnist.PIXEL_STD,
                                   rtol=1e-6)

    def test_truncated_idx_is_refused(self, tmp_path):
        import gzip
        import shutil

        for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
            shutil.copy(fashion_mnist.VENDORED_DIR / name, tmp_path / name)
        raw = gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz").read()
        with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
            f.write(raw[:-100])
        with pytest.raises(QcalError, match="truncated"):
            FashionMNISTSource("t10k", directory=tmp_path)


class TestCalibrationIsDisjoint:
    def test_overlapping_range_is_refused(self, imagenet_folder):
        root, _ = imagenet_folder
        with pytest.raises(UsageProblem, match="overlap the evaluated images 0:6"):
            plan_data(open_source(root, SMALL), None, num_images=6, calib_range="5:8",
                      preprocessing=SMALL)

    def test_default_calibration_takes_the_tail(self, imagenet_folder):
        root, _ = imagenet_folder
        plan = plan_data(open_source(root, SMALL), None, num_images=5, calib_images=3,
                         preprocessing=SMALL)
        assert (plan.calibration.start, plan.calibration.stop) == (5, 8)
        with pytest.raises(UsageProblem, match="overlap"):
            plan_data(open_source(root, SMALL), None, num_images=6, calib_images=3,
                      preprocessing=SMALL)

    def test_separate_source_never_overlaps(self, imagenet_folder, recordio_file):
        root, _ = imagenet_folder
        rec, _ = recordio_file
        plan = plan_data(open_source(root, SMALL), None, calib_data=rec, preprocessing=SMALL)
        assert len(plan.evaluation) == 8 and len(plan.calibration) == 6

    def test_same_data_through_two_source_objects_is_still_caught(self, imagenet_folder):
        root, _ = imagenet_folder
        a, b = ImageFolderSource(root, SMALL), ImageFolderSource(root, SMALL)
        with pytest.raises(UsageProblem):
            check_disjoint(Selection(a, 0, 4), Selection(b, 2, 8))

    def test_fashion_mnist_defaults(self):
        plan = plan_data(FashionMNISTSource("t10k"), FashionMNISTSource("calib"), num_images=100)
        assert plan.evaluation.source.split == "t10k"
        assert plan.calibration.source.split == "calib" and len(plan.calibration) == 500


class TestBatchCache:
    def test_each_batch_is_decoded_once(self, imagenet_folder, tmp_path):
        root, _ = imagenet_folder
        source = ImageFolderSource(root, SMALL)
        decoded = []
        original = source.decode
        source.decode = lambda idx: decoded.append(list(idx)) or original(idx)
        cache = BatchCache(tmp_path / "cache")
        first = [x for x, _ in iter_batches(Selection(source, 0, 8), 3, cache)]
        second = [x for x, _ in iter_batches(Selection(source, 0, 8), 3, cache)]
        assert decoded == [[0, 1, 2], [3, 4, 5], [6, 7]]
        for a, b in zip(first, second):
            assert np.array_equal(a, b)
        assert len(list((tmp_path / "cache").glob("*.npy"))) == 3

    def test_key_changes_with_preprocessing(self, imagenet_folder, tmp_path):
        root, _ = imagenet_folder
        cache = BatchCache(tmp_path)
        a = cache.key(ImageFolderSource(root, SMALL), [0, 1])
        b = cache.key(ImageFolderSource(root, Preprocessing(input_size=24)), [0, 1])
        assert a != b


class TestLabelFreeSources:
    def test_random_crops_are_reproducible_one_by_one(self, imagenet_folder):
        from qcal.data.sources import AugmentedSource

        root, _ = imagenet_folder
        crops = AugmentedSource(ImageFolderSource(root, SMALL), count=12, seed=3)
        assert crops.labels.tolist() == [-1] * 12
        all_at_once = crops.decode(range(12))
        assert all_at_once.shape == (12, 3, 32, 32)
        assert np.array_equal(crops.decode([9]), all_at_once[9:10])
        # crop 8 views base image 0 again, differently from crop 0
        assert not np.allclose(all_at_once[0], all_at_once[8])
        other_seed = AugmentedSource(ImageFolderSource(root, SMALL), count=12, seed=4)
        assert not np.allclose(other_seed.decode([0]), all_at_once[:1])

    def test_unlabelled_folder_has_label_minus_one(self, tmp_path):
        from tests.fixtures import write_jpeg

        for i in range(3):
            write_jpeg(tmp_path / "unlabelled" / f"p{i}.jpg", np.random.RandomState(i))
        assert ImageFolderSource(tmp_path, SMALL).labels.tolist() == [-1, -1, -1]

    def test_calibration_crops_of_a_separate_source(self, imagenet_folder, recordio_file):
        root, _ = imagenet_folder
        rec, _ = recordio_file
        plan = plan_data(open_source(root, SMALL), None, calib_data=rec, calib_crops=10,
                         fidelity_crops=5, preprocessing=SMALL)
        assert len(plan.calibration) == 10 and plan.calibration.source.kind == "augmented"
        assert len(plan.fidelity) == 5 and plan.fidelity.source.base is plan.evaluation.source
        batch = plan.calibration.source.decode([0, 1])
        assert batch.shape == (2, 3, 32, 32)

    def test_calibration_crops_of_evaluated_images_are_refused(self, imagenet_folder):
        root, _ = imagenet_folder
        with pytest.raises(UsageProblem, match="overlap"):
            plan_data(open_source(root, SMALL), None, calib_range="0:4", calib_crops=10,
                      preprocessing=SMALL)
