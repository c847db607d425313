"""The bias-corrections study's tables from a finished (or partly finished) ``qcal sweep`` folder.

    python scripts/bias_corrections_table.py OUTPUT [OUTPUT ...] [--bootstrap 1000]

For every model and variant: top-1 with its 95 % Wilson interval and two paired tests on the same
images -- against float32 and against the plain 8-bit-bias variant of the same weight granularity
(``b8``: B=8 bits, one power-of-2 bias scale a layer, no correction, no equalization) -- as exact
McNemar tests (images lost / gained, p); label-free fidelity against float32: top-1 agreement with
its Wilson interval, and the agreement's paired McNemar test against b8's; the logit SQNR with a
95 % bootstrap interval over images, and its paired bootstrap difference against b8. Where the
sweep has random crops (``fidelity_crops``), the fidelity columns are computed on the crops.

The fidelity columns need every variant's logits: the study configs set ``keep_logits: true``, so
the sweep writes them to ``variants/KEY.logits.npy`` (and ``KEY.fidelity_logits.npy`` for crops),
as it does float32's; folders of older qcal versions kept them in ``variants/KEY.npz``. A folder
without either gets the top-1 columns only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcal.drivers.sweep import LOGITS_FILES, ResultStore  # noqa: E402
from qcal.report.statistics import mcnemar_exact, wilson_interval  # noqa: E402

SEED = 0


def load_variants(folder: Path) -> list:
    """(record, arrays) of every finished variant of a sweep folder, in the order they ran."""
    store = ResultStore(folder)
    out = []
    for path in sorted(store.variants.glob("*.json"), key=lambda p: p.stat().st_mtime):
        key = path.stem
        loaded = store.load(key)  # checks the record and its arrays
        if loaded is None:
            continue
        record = loaded[0]
        arrays = dict(store.arrays(key))
        for selection, member in LOGITS_FILES.items():
            path = store.logits_path(key, selection)
            if member not in arrays and path.is_file():
                arrays[member] = np.load(path)
        out.append((record, arrays))
    return out


def is_plain_b8(variant: dict) -> bool:
    return (variant["bias_mode"] == "bits" and variant["bias_bits"] == 8
            and variant.get("bias_granularity", "tensor") == "tensor"
            and variant.get("bias_correction", "none") == "none" and not variant.get("equalize"))


def _energies(reference, logits):
    ref = reference.astype(np.float64)
    return (ref ** 2).sum(axis=1), ((ref - logits.astype(np.float64)) ** 2).sum(axis=1)


def _db(signal, noise):
    return 10 * np.log10(signal / np.maximum(noise, 1e-300))


def sqnr_interval(signal, noise, rng, rounds):
    """Logit SQNR and its 95 % bootstrap interval over images (pooled energies, as qcal's SQNR)."""
    idx = rng.randint(0, len(signal), size=(rounds, len(signal)))
    boot = _db(signal[idx].sum(axis=1), noise[idx].sum(axis=1))
    return float(_db(signal.sum(), noise.sum())), np.percentile(boot, [2.5, 97.5])


def sqnr_difference(signal, noise_a, noise_b, rng, rounds):
    """SQNR(b) - SQNR(a) on the same images, and its paired 95 % bootstrap interval."""
    idx = rng.randint(0, len(signal), size=(rounds, len(signal)))
    s = signal[idx].sum(axis=1)
    boot = _db(s, noise_b[idx].sum(axis=1)) - _db(s, noise_a[idx].sum(axis=1))
    point = float(_db(signal.sum(), noise_b.sum()) - _db(signal.sum(), noise_a.sum()))
    return point, np.percentile(boot, [2.5, 97.5])


def _test(m):
    return f"-{m['lost']}/+{m['gained']} p={m['p_value']:.2g}"


def model_table(variants, rounds: int) -> list:
    """Markdown lines for one model's variants (the float32 one among them)."""
    rng = np.random.RandomState(SEED)
    base = next(a for r, a in variants if r["description"]["variant"] is None)
    crops = "fidelity_logits" in base
    ref_logits = base["fidelity_logits" if crops else "logits"]
    ref_top1 = ref_logits.argmax(axis=1)
    labels = base["labels"]
    base_correct = base["predictions"][:, 0] == labels
    b8 = {r["description"]["variant"]["weight_granularity"]: a for r, a in variants
          if r["description"]["variant"] is not None and is_plain_b8(r["description"]["variant"])}
    where = f"{len(ref_top1)} crops" if crops else f"{len(ref_top1)} images"
    lines = [f"| variant | top-1 % [95 % CI] | vs float32 | vs b8 | agreement % ({where}) [CI] | "
             f"agreement vs b8 | logit SQNR dB [CI] | SQNR - b8 dB [CI] |",
             "|---|---|---|---|---|---|---|---|"]
    n = len(labels)
    lines.append(f"| float32 | {100 * base_correct.mean():.2f} "
                 f"[{', '.join(f'{100 * v:.2f}' for v in wilson_interval(int(base_correct.sum()), n))}]"
                 f" | | | | | | |")
    signal = None
    for record, arrays in variants:
        variant = record["description"]["variant"]
        if variant is None:
            continue
        correct = arrays["predictions"][:, 0] == labels
        if "logits" not in arrays:  # a folder whose int8 logits were not kept
            lines.append(f"| {record['variant']} | {100 * correct.mean():.2f} | "
                         f"{_test(mcnemar_exact(base_correct, correct))} | | | | | |")
            continue
        logits = arrays["fidelity_logits" if crops else "logits"]
        agree = logits.argmax(axis=1) == ref_top1
        signal, noise = _energies(ref_logits, logits)
        sqnr, (lo, hi) = sqnr_interval(signal, noise, rng, rounds)
        ref = b8.get(variant["weight_granularity"])
        vs_b8 = agree_b8 = diff = ""
        if ref is not None and not is_plain_b8(variant):
            ref_correct = ref["predictions"][:, 0] == labels
            ref_logits_v = ref["fidelity_logits" if crops else "logits"]
            vs_b8 = _test(mcnemar_exact(ref_correct, correct))
            agree_b8 = _test(mcnemar_exact(ref_logits_v.argmax(axis=1) == ref_top1, agree))
            _, noise_ref = _energies(ref_logits, ref_logits_v)
            d, (dlo, dhi) = sqnr_difference(signal, noise_ref, noise, rng, rounds)
            diff = f"{d:+.2f} [{dlo:+.2f}, {dhi:+.2f}]"
        agree_ci = wilson_interval(int(agree.sum()), len(agree))
        lines.append(
            f"| {record['variant']} | {100 * correct.mean():.2f} "
            f"[{100 * wilson_interval(int(correct.sum()), n)[0]:.2f}, "
            f"{100 * wilson_interval(int(correct.sum()), n)[1]:.2f}] | "
            f"{_test(mcnemar_exact(base_correct, correct))} | {vs_b8} | "
            f"{100 * agree.mean():.2f} [{100 * agree_ci[0]:.2f}, {100 * agree_ci[1]:.2f}] | "
            f"{agree_b8} | {sqnr:.2f} [{lo:.2f}, {hi:.2f}] | {diff} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds")
    args = parser.parse_args(argv)
    for folder in args.folders:
        by_model = {}
        for record, arrays in load_variants(folder):
            by_model.setdefault(record["model"], []).append((record, arrays))
        for model, variants in by_model.items():
            if not any(r["description"]["variant"] is None for r, _ in variants):
                continue
            print(f"\n### {model}\n")
            print("\n".join(model_table(variants, args.bootstrap)))


if __name__ == "__main__":
    main()
