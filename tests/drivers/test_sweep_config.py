
import pytest

from qcal.config import QuantOptions
from qcal.drivers.sweep_config import load_sweep_config
from qcal.errors import UsageProblem


def write(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


GOOD = """\
name: demo
models: [fmnist_resnet20_v1, fmnist_vgg11_bn]
data:
  num_images: 500
  calib_images: 200
batch_size: 32
grid:
  activation_method: [power2, kl]
  weight_granularity: [tensor, channel]
  bias: [8, 16, int32-acc]
variants:
  - {activation_method: max, skip_k_conv: 2}
  - {activation_method: power2, weight_granularity: tensor, bias: 8}
"""


def test_grid_expands_in_order_and_duplicates_collapse(tmp_path):
    cfg = load_sweep_config(write(tmp_path, GOOD))
    assert cfg.models == ("fmnist_resnet20_v1", "fmnist_vgg11_bn")
    assert cfg.batch_size == 32 and cfg.data == {"num_images": 500, "calib_images": 200}
    assert len(cfg.variants) == 2 * 2 * 3 + 1  # the last explicit variant repeats a grid point
    assert cfg.variants[0] == QuantOptions(activation_method="power2", weight_granularity="tensor",
                                           bias_mode="bits", bias_bits=8)
    assert cfg.variants[2] == QuantOptions(activation_method="power2", bias_mode="int32-acc")
    assert cfg.variants[-1] == QuantOptions(activation_method="max", skip_k_conv=2)


def test_verify_images_defaults_once_and_the_command_line_overrides_it(tmp_path):
    from qcal.config import DEFAULT_VERIFY_IMAGES

    assert load_sweep_config(write(tmp_path, GOOD)).verify_images == DEFAULT_VERIFY_IMAGES == 2
    path = write(tmp_path, GOOD + "verify_images: 0\n")
    assert load_sweep_config(path).verify_images == 0
    assert load_sweep_config(path, verify_images=5).verify_images == 5
    assert load_sweep_config(path, verify_images=None).verify_images == 0


@pytest.mark.parametrize("text, line, message", [
    ("models: [fmnist_vgg11_bn]\nbatchsize: 3\n", 2, "unknown key 'batchsize'"),
    ("models: [fmnist_vgg11_bn]\ndata:\n  num_imgs: 3\n", 3, "unknown data key 'num_imgs'"),
    ("models: [fmnist_vgg11_bn]\ndata:\n  num_images: many\n", 3, "wrong type"),
    ("models: [fmnist_vgg11_bn]\ngrid:\n  bias: [8, 33]\n", 3, "bias_bits must be an integer from 2 to 32"),
    ("models: [fmnist_vgg11_bn]\ngrid:\n  bias: [8, int16]\n", 3, "bias must be a bit count"),
    ("models: [fmnist_vgg11_bn]\ngrid:\n  weight_bits: [8, 4, 1]\n", 3,
     "weight_bits must be an integer from 2 to 8"),
    ("models: [fmnist_vgg11_bn]\ngrid:\n  intermediate_bits: [16, 8]\n", 3,
     "intermediate_bits must be an integer from 9 to 32, not 8"),
    ("models: [fmnist_vgg11_bn]\nvariants:\n  - {intermediate_bits: \"16\"}\n", 3,
     "intermediate_bits must be an integer from 9 to 32, not '16'"),
    ("models: [fmnist_vgg11_bn]\ngrid:\n  activation_method:\n    - power2\n    - entropy\n", 5,
     "activation_method must be one of"),
    ("models: [fmnist_vgg11_bn]\nvariants:\n  - {weight_scale: max, granularity: channel}\n", 3,
     "unknown variant key 'granularity'"),
    ("models:\n  - fmnist_vgg11_bn\n  - resnet1000\n", 3, "unknown model 'resnet1000'"),
    ("models: [fmnist_vgg11_bn]\ndata:\n  data: /no/such/imagenet\n", 3, "does not exist"),
    ("models: [fmnist_vgg11_bn]\nbatch_size: 0\n", 2, "batch_size must be an integer >= 1"),
    ("models: [fmnist_vgg11_bn\n", 2, "not valid YAML"),
    ("data: {num_images: 3}\n", 1, "'models' is required"),
    ("models: [fmnist_vgg11_bn]\nfloat32: false\n", 1, "nothing to run"),
    ("models: [fmnist_vgg11_bn]\nverify_images: -1\n", 2, "verify_images must be an integer >= 0"),
    ("models: [fmnist_vgg11_bn]\nverify_images: yes\n", 2, "verify_images must be an integer"),
])
def test_malformed_configs_name_their_line(tmp_path, text, line, message):
    # that nothing runs before the refusal is tests/test_bad_input.py's (an empty output folder)
    path = write(tmp_path, text)
    with pytest.raises(UsageProblem) as info:
        load_sweep_config(path)
    assert str(info.value).startswith(f"{path}:{line}:"), str(info.value)
    assert message in str(info.value)


def test_cli_refuses_bad_config_with_exit_2_and_writes_nothing(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from qcal.cli import main

    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "models: [fmnist_vgg11_bn]\ngrid:\n  skip_k_conv: [0, -1]\n")
    result = CliRunner().invoke(main, ["sweep", str(path)])
    assert result.exit_code == 2
    assert f"{path}:3:" in result.output and "skip_k_conv" in result.output
    assert not (tmp_path / "results").exists()


def test_widths_are_grid_axes(tmp_path):
    cfg = load_sweep_config(write(tmp_path, "models: [fmnist_vgg11_bn]\ngrid:\n"
                                            "  weight_bits: [8, 4]\n  activation_bits: [8, 6]\n"
                                            "variants:\n  - {weight_bits: 4, first_layer_bits: 8,"
                                            " last_layer_bits: 8}\n"))
    assert [(v.weight_bits, v.activation_bits) for v in cfg.variants] == [
        (8, 8), (8, 6), (4, 8), (4, 6), (4, 8)]
    assert cfg.variants[-1].first_layer_bits == cfg.variants[-1].last_layer_bits == 8
    assert cfg.variants[2].first_layer_bits is None


def test_intermediate_bits_is_a_grid_axis(tmp_path):
    cfg = load_sweep_config(write(tmp_path, "models: [fmnist_resnet20_v1]\ngrid:\n"
                                            "  intermediate_bits: [32, 16, 12]\n"))
    assert [v.intermediate_bits for v in cfg.variants] == [32, 16, 12]
    assert cfg.variants[0] == QuantOptions()
