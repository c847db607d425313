"""Every file the repo ships under data/ and weights/ is listed in its folder's PROVENANCE.md with
the sha256 it has, and nothing is shipped unlisted."""
import hashlib
import re
from pathlib import Path

import pytest

from qcal.files import REPO_ROOT

ROOT = REPO_ROOT
FOLDERS = sorted(p.parent for p in ROOT.glob("*/*/PROVENANCE.md")
                 if p.parent.parent.name in ("data", "weights"))
SHA256 = re.compile(r"\b[0-9a-f]{64}\b")


def listed(folder):
    """{file path: sha256} from the PROVENANCE.md tables (first cell names the file)."""
    entries = {}
    for line in (folder / "PROVENANCE.md").read_text().splitlines():
        digests = SHA256.findall(line)
        if not line.startswith("|") or len(digests) != 1:
            continue
        name = line.strip("|").split("|")[0].strip().strip("`")
        matches = [p for p in folder.rglob(Path(name).name)
                   if p.relative_to(folder).as_posix().endswith(name)]
        assert len(matches) == 1, f"{folder.name}: '{name}' matches {matches}"
        entries[matches[0]] = digests[0]
    return entries


def test_every_shipping_folder_has_provenance():
    names = {f"{p.parent.name}/{p.name}" for p in FOLDERS}
    assert {"data/fashion-mnist", "data/calibration-photos", "data/imagenet-samples",
            "weights/fashion-mnist", "weights/efficientnet-lite0"} <= names


@pytest.mark.parametrize("folder", FOLDERS, ids=[f"{p.parent.name}/{p.name}" for p in FOLDERS])
def test_checksums_match_and_nothing_is_unlisted(folder):
    entries = listed(folder)
    assert entries
    for path, digest in entries.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, path
    shipped = {p for p in folder.rglob("*") if p.is_file() and p.name != "PROVENANCE.md"
               and p.suffix != ".json"}
    assert shipped == set(entries), sorted(str(p) for p in shipped ^ set(entries))
