"""Pascal-Part and Pascal-Context annotations as Broden+'s authors read them (CSAILVision/unifiedparsing,
broden_dataset_utils/pascalseg.py): the .mat files, and the part codes their part2ind.m defines once part
names are merged.

Their part codes ignore part2ind.m's numbers: every (object, part) entry gets a readable name (the comment
of its line, else its short name), adjectives such as "left" or "upper" are dropped, and equal names share
one code, numbered in the order of the sorted (object index, short name) keys. label_assignment.csv maps
these codes (category "part" of dataset "pascal") to Broden+ parts.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import MissingFile, UserError

# The words their BrodenDataset drops from Pascal part names ("left wing" -> "wing").
COLLAPSED_WORDS = frozenset({"left", "right", "front", "back", "upper", "lower", "side"})
# Short part names part2ind.m leaves unexplained, spelled out as their normalize_readable does.
SHORT_NAMES = {"lfho": "left front hoof", "rfho": "right front hoof", "lbho": "left back hoof",
               "rbho": "right back hoof", "fwheel": "front wheel", "bwheel": "back wheel",
               "frontside": "front side", "leftside": "left side", "rightside": "right side",
               "backside": "back side", "roofside": "roof side", "leftmirror": "left mirror",
               "rightmirror": "right mirror"}

# The statements of part2ind.m, one per line.
OBJECT_HEADER = re.compile(r"% \[([^\]]*)\]")  # % [aeroplane]
ONE_PART = re.compile(r"pimap\{(\d+)\}\('([^']*)'\)\s*=\s*\d+;(?:\s*%\s*(\w[\w ]*\w))?")  # pimap{1}('lwing') = 3; % left wing
LOOP = re.compile(r"for ii = 1:(\d+)")  # for ii = 1:10
NUMBERED_PARTS = re.compile(  # pimap{1}(sprintf('engine_%d', ii)) = 10+ii; % multiple engines
    r"\s*pimap\{(\d+)\}\(sprintf\('([^']*)_%d',\s*ii\)\)\s*=\s*\d+\s*\+\s*ii\s*;(?:\s*%\s*(\w[\w ]*\w))?")
SILHOUETTE = re.compile(r"% only has si")  # the next object has only a silhouette (also misspelt "sihouette")
COPY_FROM = re.compile(r"(key|value)Set\s*=\s*\1s\(pimap\{(\d+)\}\);")  # keySet = keys(pimap{6});
COPY_TO = re.compile(r"pimap\{(\d+)\}\s*=\s*containers\.Map\(keySet,\s*valueSet\);")  # pimap{7} = containers.Map(...)
IGNORED = re.compile(r"(?:function|pimap =|\s*pimap\{ii\}|end|\s*%|remove|$)")  # remove(...) is ignored, as theirs


def load_mat(path: Path, fix: str, squeeze: bool = False) -> dict:
    """A MATLAB file as scipy reads it (`squeeze`: scipy's squeeze_me); a missing or unreadable file says `fix`."""
    if not path.is_file():
        raise MissingFile(f"{path}: missing; {fix}")
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise UserError(f"{path}: reading MATLAB files needs scipy: pip install 'upernet[broden]'") from None
    try:
        return loadmat(path, squeeze_me=squeeze)
    except (MatReadError, ValueError, OSError, LookupError, TypeError, EOFError) as error:
        raise UserError(f"{path}: not a readable .mat file ({error}); {fix}") from None


def read_part2ind(path: Path) -> dict[tuple[int, str], tuple[str, str]]:
    """(object index, part short name) -> (object name, readable part name) of Pascal-Part's part2ind.m,
    read statement by statement as their load_part2ind does: numbered parts (`engine_%d`) give one entry
    per loop index, "only has silhouette mask" gives the next object index a "silhouette" part, and
    `containers.Map(keySet, valueSet)` copies the parts of another object (its `remove` lines are ignored)."""
    if not path.is_file():
        raise MissingFile(f"{path}: missing; restore meta_file/pascal/part2ind.m from their repository")
    entries: dict[tuple[int, str], tuple[str, str]] = {}
    object_name, object_index, loop_count, copy_from = "", 0, 0, 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if match := OBJECT_HEADER.match(line):
            object_name = match[1]
        elif match := ONE_PART.match(line):
            object_index = int(match[1])
            entries[object_index, match[2]] = (object_name, match[3] or match[2])
        elif match := LOOP.match(line):
            loop_count = int(match[1])
        elif match := NUMBERED_PARTS.match(line):
            object_index = int(match[1])
            readable = match[3] if match[3] and "multiple" not in match[3] else match[2]
            for i in range(1, loop_count + 1):
                entries[object_index, f"{match[2]}_{i}"] = (object_name, readable)
        elif SILHOUETTE.match(line):
            object_index += 1
            entries[object_index, "silhouette"] = (object_name, "silhouette")
        elif match := COPY_FROM.match(line):
            copy_from = int(match[2])
        elif match := COPY_TO.match(line):
            object_index = int(match[1])
            for (other, part), (_, readable) in list(entries.items()):
                if other == copy_from:
                    entries[object_index, part] = (object_name, readable)
        elif not IGNORED.match(line):
            raise UserError(f"{path}:{number}: unrecognised line {line.strip()!r}; restore the file from their "
                            f"repository")
    return entries


def readable_name(name: str, collapse: frozenset[str] = COLLAPSED_WORDS) -> str:
    """Their normalize_readable: spell out short names, "aeroplane" -> "airplane", drop `collapse` words
    ("front side" becomes "", one more part name)."""
    name = SHORT_NAMES.get(name, name).replace("aeroplane", "airplane")
    return " ".join(word for word in name.split() if word not in collapse)


def part_codes(part2ind: dict[tuple[int, str], tuple[str, str]],
               collapse: frozenset[str] = COLLAPSED_WORDS) -> tuple[dict[tuple[int, str], int], list[str]]:
    """Their raw Pascal part labels: (object index, short name) -> code, and the part names by code
    ("-" first): equal readable names share a code, numbered in sorted key order."""
    names = ["-"]
    codes = {}
    for key in sorted(part2ind):
        name = readable_name(part2ind[key][1], collapse)
        if name not in names:
            names.append(name)
        codes[key] = names.index(name)
    return codes, names


def read_part_annotation(path: Path, codes: dict[tuple[int, str], int], fix: str) -> np.ndarray | None:
    """The raw part labels of an Annotations_Part .mat file: each object instance in turn paints its
    part masks with their codes (a later instance's parts win); None when it annotates no object.

    Args:
        path: the Annotations_Part/*.mat file.
        codes: `part_codes` of their part2ind.m.
        fix: how to restore the file, for error messages.
    """
    try:
        objects = load_mat(path, fix)["anno"][0, 0]["objects"]
        if objects.size == 0:
            return None  # their reader fails on such a file; here it has no parts
        parts = np.zeros(objects[0, 0]["mask"].shape, dtype=np.int64)
        for instance in objects.ravel():
            object_index = int(instance["class_ind"].ravel()[0])
            for part in instance["parts"].ravel():
                name = str(part["part_name"].ravel()[0])
                if (object_index, name) not in codes:
                    raise UserError(f"{path}: part {name!r} of object {object_index} is not in part2ind.m; {fix}")
                parts[part["mask"].astype(bool)] = codes[object_index, name]
    except (KeyError, IndexError, ValueError) as error:
        raise UserError(f"{path}: not a Pascal-Part annotation (anno.objects with class_ind, mask and parts: "
                        f"{error}); {fix}") from None
    return parts


def read_context_labels(path: Path, fix: str) -> np.ndarray:
    """The raw Pascal-Context object labels (LabelMap) of a context/trainval .mat file."""
    data = load_mat(path, fix)
    if "LabelMap" not in data or np.ndim(data["LabelMap"]) != 2:
        raise UserError(f"{path}: no LabelMap (H, W) in it; is it a Pascal-Context annotation? {fix}")
    return np.asarray(data["LabelMap"], dtype=np.int64)
