"""`qcal search`: cheapest first, stopped by the test or the budget, resumable, every configuration in
the result store, and a chosen.yaml that `qcal sweep` reruns to the same result."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from qcal.cli import main
from qcal.config import QuantOptions
from qcal.drivers.search import SearchSettings, cost, grid_candidates, pareto_front
from qcal.drivers.sweep import ResultStore


def test_grid_is_cheapest_first():
    settings = SearchSettings(methods=("power2", "l2"), granularities=("channel", "tensor"),
                              bias=("int32-acc", 8), skip_k_conv=(1, 0))
    grid = grid_candidates(QuantOptions(weight_bits=6), settings)
    assert len(grid) == 16
    costs = [cost(o) for o in grid]
    assert costs == sorted(costs) and costs[0] == (0, 0, 8) and costs[-1] == (1, 1, 32)
    # ties keep the order asked (power2 before l2); the base's other options are kept
    assert [o.activation_method for o in grid[:2]] == ["power2", "l2"]
    assert {o.weight_bits for o in grid} == {6}


def test_pareto_front():
    entries = [{"top1": 90.0, "cost": (0, 0, 8)}, {"top1": 89.0, "cost": (0, 0, 16)},
               {"top1": 92.0, "cost": (1, 0, 8)}, {"top1": 92.0, "cost": (1, 1, 8)},
               {"top1": 91.0, "cost": (0, 1, 8)}]
    # 1 is beaten by 0 (higher top-1, cheaper); 3 by 2 (same top-1, cheaper)
    assert pareto_front(entries) == [0, 2, 4]


CONFIG = """\
name: s
models: [fmnist_vgg11_bn]
data: {num_images: 120, calib_images: 48}
batch_size: 60
variants:
  - {simulate: true, activation_bits: 4}
search: {methods: [power2, max], granularities: tensor, margin: 9}
"""
# W8A4, simulated (numpy, nothing compiled): power2 loses ~40 points and max ~9 on these images,
# so the greedy step has to keep layers in float32 before the test passes at a 5-point margin
ARGS = ["--bias", "16", "--margin", "5",  # the section's methods, granularities; this margin
        "--ranking-images", "8", "--quiet"]


def _search(config, out, *extra):
    result = CliRunner().invoke(main, ["search", str(config), "--output", str(out), *ARGS,
                                       *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "search.json").read_text()), result.output


def test_search_stops_by_budget_then_resumes_to_the_test_and_its_yaml_reruns(tmp_path):
    config = tmp_path / "s.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    first, _ = _search(config, out, "--budget-variants", "3")
    assert first["stop_reason"] == "budget of 3 evaluated configurations spent"
    assert [r["phase"] for r in first["rows"]] == ["grid", "grid", "greedy 1"]
    assert not any(r["non_inferior"] for r in first["rows"]) and first["chosen"] is None
    assert not (out / "chosen.yaml").exists()
    assert first["test"].startswith("Tango's score test for non-inferiority")
    ranking = json.loads((out / "ranking.json").read_text())["layers"]
    assert first["rows"][2]["variant"].endswith(f"float:{ranking[0]} simulated")

    second, output = _search(config, out, "--budget-variants", "12")
    log = (out / "sweep.log").read_text().split("sensitivity ranking: reusing")
    assert len(log) == 2  # the ranking was read back, not recomputed
    rows = second["rows"]
    assert rows[:3] == first["rows"][:3]  # the finished configurations, reused as they were
    assert second["stop_reason"].startswith("greedy float layers: the test passed with ")
    assert rows[-1]["non_inferior"] and not any(r["non_inferior"] for r in rows[:-1])
    assert second["chosen"] == rows[-1]
    k = len(rows) - 2  # float layers of the last greedy step
    assert second["stop_reason"] == f"greedy float layers: the test passed with {k} float layer(s)"
    assert rows[-1]["float_layers"] == k and rows[-1]["lower_bound"] > -5
    assert "Pareto front" in output and "Tango's score test" in output
    # every configuration is a record of the result store, and in the sweep's own table
    table = pd.read_csv(out / "results.csv")
    assert set(table["variant"]) == {"float32"} | {r["variant"] for r in rows}
    store = ResultStore(out)
    assert all(store.load(r["key"]) is not None for r in rows)

    # chosen.yaml reruns, with qcal sweep, to the same predictions
    rerun = tmp_path / "rerun"
    result = CliRunner().invoke(main, ["sweep", str(out / "chosen.yaml"), "--output", str(rerun),
                                       "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    again = json.loads((rerun / "results.json").read_text())
    assert again["variants"][1]["key"] == second["chosen"]["key"]  # the very same variant
    _, expected, labels = store.load(second["chosen"]["key"])
    _, predictions, rerun_labels = ResultStore(rerun).load(again["variants"][1]["key"])
    assert np.array_equal(predictions, expected) and np.array_equal(labels, rerun_labels)
    assert again["rows"][1]["top1"] == pytest.approx(second["chosen"]["top1"])


@pytest.mark.parametrize("args, config_text, message", [
    (["--margin", "100"], CONFIG, "Invalid value for '--margin'"),
    (["--bias", "8,40"], CONFIG, "bias bits must be from 2 to 32, not 40"),
    (["--methods", "power2,,l2"], CONFIG, "an empty item in 'power2,,l2'"),
    ([], CONFIG.replace("margin: 9", "margin: lots"), "s.yaml:7: search.margin: 'lots' is not"),
    ([], CONFIG.replace("margin: 9", "budget: 9"), "s.yaml:7: unknown search key 'budget'"),
    ([], CONFIG.replace("[fmnist_vgg11_bn]", "[fmnist_vgg11_bn, fmnist_resnet20_v1]"),
     "a search takes one model, not 2"),
    ([], CONFIG.replace("search:", "  - {activation_method: l2}\nsearch:"),
     "a search takes at most one variant (the base configuration), not 2"),
])
def test_bad_input_is_one_line(tmp_path, args, config_text, message):
    config = tmp_path / "s.yaml"
    config.write_text(config_text)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["search", str(config), "--output", str(out), *args],
                                catch_exceptions=False)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize("name", ["search-fmnist-resnet56", "search-lite0", "calib-repeats",
                                  "calib-repeats-lite0"])
def test_shipped_configs_parse(name):
    from qcal.drivers.sweep_config import parse_sweep_config
    from qcal.files import REPO_ROOT

    config, problems = parse_sweep_config(REPO_ROOT / "configs" / f"{name}.yaml")
    assert not problems and len(config.models) == 1
    assert config.calib_repeats == (5 if name.startswith("calib") else 1)
    if name.startswith("search"):
        from qcal.cli.search import settings_values

        values = settings_values({}, config.sections["search"], lambda key: key)
        assert values["margin"] == 0.3 and values["budget_variants"] in (5, 12)
