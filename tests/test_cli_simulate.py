"""`--simulate`: the fake-quantized model, labelled, beside the compiled integer model it simulates."""
from __future__ import annotations

import json

from click.testing import CliRunner

from qcal.cli import main


def test_simulated_rows_are_labelled_and_match_the_integer_model(tmp_path):
    config = tmp_path / "sim.yaml"
    config.write_text("models: [fmnist_resnet20_v1]\ndata: {num_images: 48, calib_images: 32}\n"
                      "batch_size: 16\ngrid:\n  simulate: [false, true]\n  weight_bits: [4]\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["sweep", str(config), "--output", str(out), "--quiet"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in summary["rows"]}
    integer, simulated = rows["a:power2 w:power2/tensor b16 W4A8"], \
        rows["a:power2 w:power2/tensor b16 W4A8 simulated"]
    # power-of-2 scales: the simulation is exact, so the same images are right
    assert simulated["top1"] == integer["top1"] and simulated["images"] == 48
    assert integer["verified"] > 0 and simulated["verified"] is None  # nothing compiled to verify
    records = [v for v in summary["variants"] if (v["description"]["variant"] or {}).get("simulate")]
    assert len(records) == 1
    predictions = (out / "predictions.csv").read_text()
    assert "simulated" in predictions
