"""Load stage, class folders: which label index each folder of ``ROOT/<class>/<image>`` stands for.

Folders named by ImageNet synset ids keep the standard ImageNet-1k indices, folders named by numbers
are those numbers, any other names are numbered in sorted order (torchvision's ``ImageFolder``,
gluon's ``ImageFolderDataset``); ``ROOT/labels.txt`` overrides all of that.
"""
from __future__ import annotations

from pathlib import Path

from qcal.errors import QcalError

UNLABELLED_FOLDER = "unlabelled"  # images without a class: label -1 (calibration, fidelity)


def class_indices(names) -> dict:
    """Class folder name -> label index, for the class folders of one root.

    - every name an ImageNet synset id (``n01440764``): the standard ImageNet-1k index, the
      position in the sorted list of all 1000 (what gluoncv and torchvision use), so a subset of
      the classes keeps the model's indices;
    - every name a decimal number (``0`` .. ``9``, ``065``): that number;
    - otherwise (``cat``, ``dog``, ...): the position in the sorted names, as torchvision's
      ``ImageFolder`` and gluon's ``ImageFolderDataset`` number their classes.
    A folder named ``unlabelled`` holds images without a class (label -1) in every case.
    """
    from qcal.data.imagenet_classes import WNID_TO_INDEX

    names = sorted(n for n in names if n != UNLABELLED_FOLDER)
    if names and all(n in WNID_TO_INDEX for n in names):
        labels = {n: WNID_TO_INDEX[n] for n in names}
    elif all(n.isdigit() for n in names):
        labels = {n: int(n) for n in names}
    else:
        labels = {n: i for i, n in enumerate(names)}
    return {**labels, UNLABELLED_FOLDER: -1}


LABELS_FILE = "labels.txt"  # ROOT/labels.txt: the class folder names in index order, one a line


def labels_from_file(path: Path, folders) -> dict:
    """Folder name -> index from a labels file (line i names the folder of class i)."""
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise QcalError(f"{path} names class '{twice}' twice")
    unlisted = [f for f in folders if f not in names and f != UNLABELLED_FOLDER]
    if unlisted:
        raise QcalError(f"{path} does not list the class folder '{unlisted[0]}' "
                        f"({len(unlisted)} unlisted in all)")
    return {**{n: i for i, n in enumerate(names)}, UNLABELLED_FOLDER: -1}
