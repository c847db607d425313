#!/usr/bin/env python
"""A researcher's own model, end to end: train gluoncv CIFAR nets, export them, evaluate with qcal.

    nice python scripts/byom_fmnist.py train --out byom-work --seed 7
    nice python scripts/byom_fmnist.py evaluate --out byom-work

``train`` trains gluoncv ``cifar_resnet56_v1`` and ``cifar_resnet20_v2`` (a depth/version pair and
a seed the embedded models do not use) on Fashion-MNIST read from Debian's ``dataset-fashion-mnist``
the way a user outside qcal would: each 28x28 grey image repeated to three channels, zero-padded to
32x32, normalised by the training set's own mean/std. It then writes what such a user has:

- ``NAME.params`` (``save_parameters``: for ``--model cifar_resnet20_v2 --params``),
- ``NAME-symbol.json`` + ``NAME-0000.params`` (``HybridBlock.export``),
- ``NAME.onnx`` (``mxnet.onnx.export_model``, dynamic batch: ``[None, 3, 32, 32] -> [None, None]``),
- ``NAME.preprocess.json`` beside each (qcal's preprocessing keys),
- ``test-png/0 .. 9/`` the first ``--test-images`` test images as 28x28 grey PNGs,
  ``calib-png/0 .. 9/`` the 2,000 training images held out of training.

``evaluate`` runs one ``qcal evaluate`` command per model file (float32 and one int8 variant) on the
PNG folder and compares the float32 top-1, image by image, with MXNet's own forward of the same
network on the same PNGs (decoded and preprocessed here with numpy, not by qcal). It prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qcal.data import fashion_mnist  # noqa: E402

MODELS = ("cifar_resnet56_v1", "cifar_resnet20_v2")
CALIB_HOLDOUT = 2000
PAD = 2


def user_preprocess(images_uint8, mean, std):
    """uint8 N x 28 x 28 -> float32 N x 3 x 32 x 32: grey to three channels, zero pixel padding,
    then the user's normalisation (what the user trained with, written without qcal)."""
    x = np.pad(images_uint8, ((0, 0), (PAD, PAD), (PAD, PAD))).astype(np.float32) / 255.0
    x = (x - np.float32(mean)) / np.float32(std)
    return np.repeat(x[:, None], 3, axis=1).astype(np.float32)


def write_pngs(folder: Path, images, labels):
    import cv2

    for i, (image, label) in enumerate(zip(images, labels)):
        path = folder / str(int(label)) / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), image)


def train(args):
    import mxnet as mx
    from gluoncv.model_zoo import get_model
    from mxnet import autograd, gluon

    args.out.mkdir(parents=True, exist_ok=True)
    images, labels = fashion_mnist.load_split(args.data_dir, "train")
    train_x = images[:-CALIB_HOLDOUT][:args.train_images]
    train_y = labels[:-CALIB_HOLDOUT][:args.train_images]
    test_x, test_y = fashion_mnist.load_split(args.data_dir, "t10k")
    write_pngs(args.out / "test-png", test_x[:args.test_images], test_y[:args.test_images])
    write_pngs(args.out / "calib-png", images[-CALIB_HOLDOUT:], labels[-CALIB_HOLDOUT:])
    # the user's own statistics: of the unpadded training pixels, on the 0..1 scale
    mean = float(train_x.mean() / 255.0)
    std = float(train_x.std() / 255.0)
    x_train = user_preprocess(train_x, mean, std)
    preprocessing = {"input_size": 32, "resize": "none", "pad": PAD, "channels": 3,
                     "mean": [round(mean, 6)] * 3, "std": [round(std, 6)] * 3}
    record = {"seed": args.seed, "epochs": args.epochs, "train_images": int(len(x_train)),
              "preprocessing": preprocessing, "models": {}}
    if (args.out / "train.json").is_file():  # models trained by an earlier run stay listed
        record["models"] = json.loads((args.out / "train.json").read_text())["models"]
    command = "python scripts/byom_fmnist.py " + " ".join(sys.argv[1:])
    for name in args.models:
        mx.random.seed(args.seed)
        rng = np.random.RandomState(args.seed)
        net = get_model(name, classes=10)
        net.initialize(mx.init.Xavier(magnitude=2))
        net.hybridize(static_alloc=True, static_shape=True)
        steps_per_epoch = len(x_train) // args.batch_size
        total = int(round(args.epochs * steps_per_epoch))
        trainer = gluon.Trainer(net.collect_params(), "sgd",
                                {"learning_rate": args.lr, "momentum": 0.9, "wd": 1e-4})
        loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        start, step = time.time(), 0
        while step < total:
            order = rng.permutation(len(x_train))
            for b in range(steps_per_epoch):
                if step >= total:
                    break
                idx = order[b * args.batch_size:(b + 1) * args.batch_size]
                xb = x_train[idx]
                flip = rng.rand(len(idx)) < 0.5
                xb[flip] = xb[flip, :, :, ::-1]
                trainer.set_learning_rate(0.5 * args.lr * (1 + math.cos(math.pi * step / total)))
                data, label = mx.nd.array(xb), mx.nd.array(train_y[idx])
                # MXNet updates BatchNorm statistics in the backward pass: a gradient on the input
                # lets ResNet v2's input BatchNorm learn this data's statistics (docs in NOTES)
                data.attach_grad()
                with autograd.record():
                    loss = loss_fn(net(data), label)
                loss.backward()
                trainer.step(len(idx))
                step += 1
                if step % 50 == 0:
                    print(f"{name} step {step}/{total} loss {loss.mean().asscalar():.3f} "
                          f"{step * args.batch_size / (time.time() - start):.0f} img/s", flush=True)
        seconds = time.time() - start
        export(net, args.out / name, preprocessing)
        record["models"][name] = {"train_seconds": round(seconds, 1), "steps": total,
                                  "command": command}
        (args.out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def export(net, prefix: Path, preprocessing: dict):
    import mxnet as mx
    from mxnet import onnx as mx_onnx

    # a hybridized (static_alloc) network applies the last backward's BatchNorm statistics at its
    # next forward: run one and wait, or save_parameters and export would write different weights
    net(mx.nd.zeros((1, 3, 32, 32)))
    mx.nd.waitall()
    net.save_parameters(str(prefix) + ".params")
    net.export(str(prefix))  # PREFIX-symbol.json + PREFIX-0000.params
    x = mx.nd.array(np.random.RandomState(0).normal(size=(4, 3, 32, 32)))
    exported = mx.gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data"],
                                            f"{prefix}-0000.params")
    assert np.array_equal(net(x).asnumpy(), exported(x).asnumpy()), "export differs from the net"
    mx_onnx.export_model(f"{prefix}-symbol.json", f"{prefix}-0000.params",
                         in_shapes=[(1, 3, 32, 32)], in_types=[np.float32],
                         onnx_file_path=f"{prefix}.onnx", dynamic=True,
                         dynamic_input_shapes=[(None, 3, 32, 32)])
    Path(f"{prefix}.preprocess.json").write_text(json.dumps(preprocessing, indent=2) + "\n")


def mxnet_predictions(out: Path, name: str, mean, std, num_images=None):
    """MXNet's own top-1 on the PNG folder: decoded with OpenCV, preprocessed with numpy."""
    import cv2
    import mxnet as mx

    files = sorted((out / "test-png").glob("*/*.png"), key=lambda p: p.name)[:num_images]
    labels = np.array([int(p.parent.name) for p in files])
    images = np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in files])
    x = user_preprocess(images, mean[0], std[0])
    net = mx.gluon.SymbolBlock.imports(f"{out / name}-symbol.json", ["data"],
                                       f"{out / name}-0000.params")
    logits = np.concatenate([net(mx.nd.array(x[i:i + 100])).asnumpy()
                             for i in range(0, len(x), 100)])
    return [p.name for p in files], logits.argmax(1), labels


def qcal_run(out: Path, results: Path, model_args: list, num_images=None) -> dict:
    limit = ["--num-images", str(num_images)] if num_images else []
    command = [sys.executable, "-m", "qcal.cli", "evaluate", *model_args, *limit,
               "--data", str(out / "test-png"), "--calib-data", str(out / "calib-png"),
               "--calib-images", "500", "--bias-bits", "16", "--results-dir", str(results),
               "--cache-dir", str(out / "cache"), "--quiet"]
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    summary = json.loads((results / "results.json").read_text())
    return {"command": " ".join(["qcal", *command[3:]]), "seconds": round(time.time() - start, 1),
            "rows": summary["rows"], "predictions": results / "predictions.csv"}


def evaluate(args):
    import csv

    record = json.loads((args.out / "train.json").read_text())
    pre = record["preprocessing"]
    lines = ["| model | file given to qcal | float32 top-1 (qcal) | MXNet's top-1 | images where "
             "qcal's float32 class != MXNet's | int8 top-1 (qcal) |", "| --- | --- | --- | --- | "
             "--- | --- |"]
    for name in args.models or record["models"]:
        files, mx_pred, labels = mxnet_predictions(args.out, name, pre["mean"], pre["std"],
                                                   args.num_images)
        mx_top1 = float((mx_pred == labels).mean())
        prefix = args.out / name
        routes = {"NAME-symbol.json + NAME-0000.params": ["--model", f"{prefix}-symbol.json",
                                                          "--params", f"{prefix}-0000.params"],
                  "NAME.onnx (dynamic batch)": ["--model", f"{prefix}.onnx"],
                  "gluoncv name + NAME.params": ["--model", name, "--params", f"{prefix}.params"]}
        for route, model_args in routes.items():
            tag = route.split()[0].replace(".", "_")
            run = qcal_run(args.out, args.out / "results" / f"{name}-{tag}", model_args,
                           args.num_images)
            rows = {r["variant"]: r for r in run["rows"]}
            float_row = rows["float32"]
            int8_row = next(r for v, r in rows.items() if v != "float32")
            with open(run["predictions"]) as f:
                preds = [r for r in csv.DictReader(f) if r["variant"] == "float32"]
            qcal_pred = np.array([int(r["pred1"]) for r in preds])
            disagree = int((qcal_pred != mx_pred).sum()) if len(qcal_pred) == len(mx_pred) else -1
            lines.append(f"| {name} | {route} | {float_row['top1']:.2f} | "
                         f"{100 * mx_top1:.2f} | {disagree} | {int8_row['top1']:.2f} |")
            print(run["command"], f"({run['seconds']} s)", flush=True)
    table = "\n".join(lines)
    print(table)
    (args.out / f"table-{'-'.join(args.models or ['all'])}.md").write_text(table + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--models", nargs="+", default=list(MODELS))
    t.add_argument("--seed", type=int, default=7)
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--train-images", type=int, default=20000)
    t.add_argument("--test-images", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--data-dir", type=Path, default=fashion_mnist.DEBIAN_DIR)
    e = sub.add_parser("evaluate")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--num-images", type=int, help="the first N test PNGs (default: all)")
    e.add_argument("--models", nargs="+", help="default: every model in train.json")
    args = parser.parse_args()
    train(args) if args.step == "train" else evaluate(args)


if __name__ == "__main__":
    main()
