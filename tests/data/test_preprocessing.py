"""The declared preprocessing pipeline against independent numpy arithmetic on real PNG files, and
its one option rule (CLI, sweep YAML and preprocessing files share it)."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcal.data.preprocessing import PREPROCESSING_KEYS, Preprocessing, coerce, read_preprocessing_file
from qcal.data.sources import ImageFolderSource
from qcal.errors import QcalError, UsageProblem


def write_png(path, image):
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


@pytest.fixture
def grey_folder(tmp_path):
    """Two 28x28 grey PNGs (class folders 0/ and 7/), the Fashion-MNIST shape."""
    rng = np.random.RandomState(3)
    images = [rng.randint(0, 256, size=(28, 28), dtype=np.uint8) for _ in range(2)]
    write_png(tmp_path / "0" / "a.png", images[0])
    write_png(tmp_path / "7" / "b.png", images[1])
    return tmp_path, images


def test_grey_repeated_padded_and_normalised_as_numpy_says(grey_folder):
    root, images = grey_folder
    pre = Preprocessing(input_size=32, resize="none", pad=2, channels=3, mean=(0.3, 0.2, 0.1),
                        std=(0.4, 0.5, 0.25))
    source = ImageFolderSource(root, pre)
    batch = source.decode([0, 1])
    assert batch.shape == (2, 3, 32, 32) and source.labels.tolist() == [0, 7]
    for x, image in zip(batch, images):
        padded = np.pad(image, 2).astype(np.float32) / 255.0
        expected = np.stack([(padded - m) / s for m, s in zip(pre.mean, pre.std)])
        np.testing.assert_allclose(x, expected, rtol=0, atol=1e-6)


def test_one_channel_raw_pixel_scale_and_pad_value(grey_folder):
    root, images = grey_folder
    pre = Preprocessing(input_size=30, resize="none", pad=1, pad_value=255, channels=1,
                        scale=255, mean=(100.0,), std=(2.0,))
    x = ImageFolderSource(root, pre).decode([1])[0]
    expected = (np.pad(images[1].astype(np.float32), 1, constant_values=255) - 100.0) / 2.0
    assert x.shape == (1, 30, 30)
    np.testing.assert_allclose(x[0], expected, rtol=0, atol=1e-5)


def test_resize_none_centre_crops_and_refuses_a_small_image(grey_folder):
    root, images = grey_folder
    pre = Preprocessing(input_size=20, resize="none", channels=1, mean=(0.0,), std=(1.0,))
    x = ImageFolderSource(root, pre).decode([0])[0, 0]
    np.testing.assert_allclose(x, images[0][4:24, 4:24] / np.float32(255), atol=1e-7)
    too_big = Preprocessing(input_size=40, resize="none", channels=1, mean=(0.0,), std=(1.0,))
    with pytest.raises(QcalError, match="is 28x28, smaller than the 40x40 crop"):
        ImageFolderSource(root, too_big).decode([0])


@settings(max_examples=15, deadline=None)
@given(size=st.integers(8, 41), pad=st.integers(0, 3), resize=st.sampled_from(["short", "exact"]),
       channels=st.sampled_from([1, 3]), ratio=st.floats(0.5, 1.0))
def test_every_option_combination_gives_the_declared_shape(tmp_path_factory, size, pad, resize,
                                                           channels, ratio):
    root = tmp_path_factory.mktemp("odd")
    rng = np.random.RandomState(size)
    write_png(root / "cat" / "x.png", rng.randint(0, 256, size=(23, 37, 3), dtype=np.uint8))
    pre = Preprocessing(input_size=size, pad=pad, resize=resize, channels=channels,
                        crop_ratio=ratio, mean=(0.5,), std=(0.25,))
    x = ImageFolderSource(root, pre).decode([0])
    assert x.shape == (1, channels, size, size) and x.dtype == np.float32
    if pad:  # the border is pad_value 0 after normalisation: (0 - 0.5) / 0.25
        assert np.all(x[0, :, :pad, :] == -2.0) and np.all(x[0, :, :, -pad:] == -2.0)


@pytest.mark.parametrize("key,value,message", [
    ("resize", "stretch", "resize must be one of short, exact, none"),
    ("channels", 2, "channels must be one of 1, 3"),
    ("pad", -1, "pad must be at least 0"),
    ("input_size", 7.5, "input_size must be an integer"),
    ("mean", "a,b", "mean must be comma-separated numbers"),
    ("shear", 1, "unknown preprocessing key 'shear'"),
])
def test_bad_values_are_named(key, value, message):
    with pytest.raises(UsageProblem, match=message):
        coerce(key, value)


def test_values_from_cli_text_yaml_and_json_agree():
    assert coerce("mean", "0.5,0.25") == coerce("mean", [0.5, 0.25]) == (0.5, 0.25)
    assert coerce("mean", 0.5) == (0.5,)
    assert coerce("channels", "3") == coerce("channels", 3) == 3
    assert coerce("scale", "255") == 255 and coerce("pad", "2") == 2
    with pytest.raises(UsageProblem, match="mean has 2 values for 3 channel"):
        Preprocessing(mean=(0.5, 0.5))
    with pytest.raises(UsageProblem, match="pad 4 leaves nothing"):
        Preprocessing(input_size=8, pad=4)


def test_preprocessing_file_is_checked_by_the_same_rule(tmp_path):
    path = tmp_path / "net.preprocess.json"
    assert read_preprocessing_file(path) == {}
    path.write_text(json.dumps({"input_size": 32, "pad": 2, "mean": [0.29] * 3}))
    assert read_preprocessing_file(path) == {"input_size": 32, "pad": 2, "mean": (0.29,) * 3}
    path.write_text(json.dumps({"pad": 2, "colour": "rgb"}))
    with pytest.raises(QcalError, match="net.preprocess.json: unknown preprocessing key 'colour'"):
        read_preprocessing_file(path)
    assert set(Preprocessing().to_dict()) == set(PREPROCESSING_KEYS)


def write_idx(path, array, gz):
    import gzip
    import struct

    dims = struct.pack(">" + "I" * array.ndim, *array.shape)
    header = struct.pack(">I", 0x0800 | array.ndim) + dims
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def test_npz_and_idx_arrays_are_preprocessed_like_the_same_pngs(grey_folder, tmp_path):
    from qcal.data.sources import open_source

    root, images = grey_folder
    pre = Preprocessing(input_size=32, resize="none", pad=2, channels=3, mean=(0.3,), std=(0.4,))
    expected = ImageFolderSource(root, pre).decode([0, 1])
    stacked, labels = np.stack(images), np.array([0, 7])
    np.savez(tmp_path / "grey.npz", images=stacked, labels=labels)
    rgb = np.repeat(stacked[..., None], 3, axis=3)
    np.savez(tmp_path / "rgb.npz", images=rgb, labels=labels)
    for gz in (True, False):
        suffix = ".gz" if gz else ""
        write_idx(tmp_path / f"t{suffix}-images-idx3-ubyte{suffix}", stacked, gz)
        write_idx(tmp_path / f"t{suffix}-labels-idx1-ubyte{suffix}", labels, gz)
    for name in ("grey.npz", "rgb.npz", "t.gz-images-idx3-ubyte.gz", "t-images-idx3-ubyte"):
        source = open_source(tmp_path / name, pre)
        assert source.kind == "arrays" and source.labels.tolist() == [0, 7]
        np.testing.assert_array_equal(source.decode([0, 1]), expected)


def test_bad_array_files_are_named(tmp_path):
    from qcal.data.sources import open_source

    np.savez(tmp_path / "a.npz", images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(QcalError, match="a.npz has no 'labels' array"):
        open_source(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.zeros(3, int))
    with pytest.raises(QcalError, match="2 images but 3 int64 labels"):
        open_source(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", images=np.zeros((2, 8, 8), np.float32), labels=np.zeros(2, int))
    with pytest.raises(QcalError, match="images must be uint8"):
        open_source(tmp_path / "c.npz")
    write_idx(tmp_path / "d-images-idx3-ubyte", np.zeros((2, 8, 8), np.uint8), gz=False)
    with pytest.raises(QcalError, match="IDX labels file \\(beside the images\\) not found"):
        open_source(tmp_path / "d-images-idx3-ubyte")
