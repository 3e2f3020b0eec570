"""Build the emoji image-text set from Debian packages, offline and reproducibly.

    python examples/emoji/build_dataset.py --out runs/emoji          # about a minute on 2 cores

A real image-text retrieval set for B3's multimodal path (MMEB-style: a query and a positive,
each text or an image, a task per kind of pair) from what a Debian machine can install:

- images: every fully-qualified emoji of Emoji 15.0 drawn by Noto Color Emoji
  (`fonts-noto-color-emoji`, SIL OFL 1.1) with Pillow, on white, `--size` pixels square;
- names, groups and subgroups: `emoji-test.txt` of `unicode-data` (Unicode licence);
- English keywords and German names: the CLDR annotations of `unicode-cldr-core` (Unicode
  licence; `annotationsDerived` names the skin-tone and other sequence variants).

Five tasks, one row per emoji each where its texts exist:

| task | query | positive |
|---|---|---|
| image-to-name | image | English name ("grinning face") |
| name-to-image | English name | image |
| image-to-category | image | group and subgroup ("Smileys & Emotion: face smiling"), shared by many |
| image-to-name-de | image | German name ("grinsendes Gesicht") |
| keywords-to-image | English keywords without the name ("face, grin") | image |

The 5 skin tones of an emoji are natural hard negatives (and false negatives, for the
category task): they share `source` (the emoji without its skin-tone modifiers), the column to
split on so that no variant of a test emoji is trained on.

Each row also lists its candidates, as MMEB's evaluation sets do (`tgt_text`, `tgt_img_path`):
its positive first, then the other distinct positives of its task when they are few (the 99
categories: a classification task's label set), else 19 of them drawn at random (MMEB draws
1,000), each text or image; `dataset.columns.candidates` / `candidateImages` make `b3 eval`
report accuracy@1 over them.

Written under --out: `emoji.parquet` (columns id, task, query, query_image, positive,
positive_image, candidates, candidate_images, source, emoji, group, subgroup; an image column
holds a path under --out, the image root, or null), `images/noto/<codepoints>.png`, and `emoji.json` with the packages'
versions and licences, the counts per task and what was left out (emoji the font draws as more
than one glyph). The same packages give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from b3.progress import progress  # noqa: E402

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """What to install or pass instead; exit 2."""


PACKAGES = {  # Debian package -> (the file of it we read, its licence)
    "fonts-noto-color-emoji": ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", "OFL-1.1"),
    "unicode-data": ("/usr/share/unicode/emoji/emoji-test.txt", "Unicode-DFS-2016"),
    "unicode-cldr-core": ("/usr/share/unicode/cldr/common/annotations/en.xml", "Unicode-DFS-2016"),
}
CLDR = Path("/usr/share/unicode/cldr/common")
NOTO_SIZE = 109  # Noto Color Emoji's only bitmap strike: 136 x 128 pixels a glyph
CANVAS = (136, 128)
SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
VARIATION_SELECTOR = "\ufe0f"
TASKS = ("image-to-name", "name-to-image", "image-to-category", "image-to-name-de", "keywords-to-image")
COLUMNS = ("id", "task", "query", "query_image", "positive", "positive_image", "candidates", "candidate_images",
           "source", "emoji", "group", "subgroup")
LABEL_SET = 100  # a task with at most this many distinct positives lists them all as candidates
CANDIDATES = 20  # else: the positive and 19 others


@dataclass(frozen=True)
class Emoji:
    codepoints: str  # "1F476-1F3FF": the image's file name
    text: str  # the emoji itself
    name: str  # emoji-test.txt's English name
    group: str
    subgroup: str

    @property
    def source(self) -> str:
        """The emoji without skin tones: all its variants split together."""
        return "".join(c for c in self.text if c not in SKIN_TONES)


def read_emoji_test(path: Path) -> list[Emoji]:
    """The fully-qualified emoji of emoji-test.txt, in its order, with group and subgroup."""
    found, group, subgroup = [], "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line:
            codes, comment = line.split(";", 1)[0].split(), line.split("#", 1)[1].split()
            # comment: the emoji, its version ("E1.0"), then the name
            found.append(Emoji("-".join(codes), "".join(chr(int(c, 16)) for c in codes),
                               " ".join(comment[2:]), group, subgroup))  # fmt: skip
    return found


def read_annotations(language: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """CLDR's names (type="tts") and keywords of `language`, by emoji without variation
    selectors (CLDR writes most emoji without U+FE0F), the derived sequences included."""
    names: dict[str, str] = {}
    keywords: dict[str, list[str]] = {}
    for folder in ("annotations", "annotationsDerived"):
        path = CLDR / folder / f"{language}.xml"
        for node in ET.parse(path).getroot().iter("annotation"):
            key = node.get("cp", "").replace(VARIATION_SELECTOR, "")
            text = (node.text or "").strip()
            if not text or text == "↑↑↑":  # CLDR's "inherit from the parent locale"
                continue
            if node.get("type") == "tts":
                names.setdefault(key, text)
            else:
                keywords.setdefault(key, [k.strip() for k in text.split("|") if k.strip()])
    return names, keywords


def draw(font: ImageFont.FreeTypeFont, emoji: Emoji, size: int) -> Image.Image | None:
    """The emoji on white, size x size; None when the font has no single glyph for it."""
    left, top, right, bottom = font.getbbox(emoji.text)
    if right - left > CANVAS[0]:  # drawn as several glyphs: the font lacks the sequence
        return None
    canvas = Image.new("RGB", (CANVAS[0], CANVAS[0]), "white")  # square, the glyph centred
    ImageDraw.Draw(canvas).text((0, (CANVAS[0] - CANVAS[1]) // 2), emoji.text, font=font, embedded_color=True)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def rows_of(emoji: Emoji, image: str, en: tuple[dict, dict], de: tuple[dict, dict]) -> list[dict]:
    """The emoji's pairs, one per task its texts allow."""
    key = emoji.text.replace(VARIATION_SELECTOR, "")
    name = en[0].get(key, emoji.name)
    keywords = [k for k in en[1].get(key, []) if k.lower() != name.lower()]
    category = f"{emoji.group}: {emoji.subgroup.replace('-', ' ')}"
    pairs = {
        "image-to-name": (None, image, name, None),
        "name-to-image": (name, None, None, image),
        "image-to-category": (None, image, category, None),
        "image-to-name-de": (None, image, de[0].get(key), None),
        "keywords-to-image": (", ".join(keywords) or None, None, None, image),
    }
    common = {"source": emoji.source, "emoji": emoji.text, "group": emoji.group, "subgroup": emoji.subgroup}
    return [{"id": f"{task}/{emoji.codepoints}", "task": task, "query": q, "query_image": qi,
             "positive": p, "positive_image": pi, **common}
            for task, (q, qi, p, pi) in pairs.items()
            if (q or qi) and (p or pi)]  # fmt: skip


def add_candidates(rows: list[dict]) -> None:
    """Each row's candidate list (its positive first, then other distinct positives of its
    task), drawn by a generator seeded with the row's id: a rebuild draws the same."""
    by_task: dict[str, dict[tuple, None]] = {}
    for r in rows:
        by_task.setdefault(r["task"], {})[(r["positive"], r["positive_image"])] = None
    for r in rows:
        own = (r["positive"], r["positive_image"])
        pool = [p for p in by_task[r["task"]] if p != own]
        if len(pool) >= LABEL_SET:
            pool = random.Random(hashlib.sha256(r["id"].encode()).hexdigest()).sample(pool, CANDIDATES - 1)
        r["candidates"] = [text for text, _ in [own, *pool]]
        r["candidate_images"] = [image for _, image in [own, *pool]]


def package_versions() -> dict[str, dict[str, str]]:
    """Each package's installed version and licence; exit 2 naming a missing one."""
    out = {}
    for package, (path, licence) in PACKAGES.items():
        if not Path(path).exists():
            raise BadInput(f"build_dataset: needs the Debian package {package} ({path} is missing): "
                             f"apt-get install {' '.join(PACKAGES)}")  # fmt: skip
        version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                                 capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
        out[package] = {"version": version or "unknown (not installed by dpkg)", "licence": licence}
    return out


def build(out: Path, size: int, groups: list[str] | None) -> dict:
    packages = package_versions()
    emoji = read_emoji_test(Path(PACKAGES["unicode-data"][0]))
    known = sorted({e.group for e in emoji})
    subgroups = {e.subgroup for e in emoji}
    if groups and (unknown := sorted(set(groups) - set(known) - subgroups)):
        raise BadInput(f"build_dataset: --groups: no emoji group or subgroup {', '.join(unknown)}; "
                       f"the groups: {', '.join(known)}")  # fmt: skip
    emoji = [e for e in emoji if not groups or e.group in groups or e.subgroup in groups]
    en, de = read_annotations("en"), read_annotations("de")
    font = ImageFont.truetype(PACKAGES["fonts-noto-color-emoji"][0], NOTO_SIZE)
    images = out / "images" / "noto"
    images.mkdir(parents=True, exist_ok=True)
    rows, left_out = [], []
    with progress(len(emoji), "draw", unit="emoji") as bar:
        for e in emoji:
            picture = draw(font, e, size)
            bar.update(1)
            if picture is None:
                left_out.append(f"{e.codepoints} {e.name}")
                continue
            image = f"images/noto/{e.codepoints}.png"
            picture.save(out / image, optimize=True)
            rows.extend(rows_of(e, image, en, de))
    add_candidates(rows)
    table = pa.table({c: [r[c] for r in rows] for c in COLUMNS})
    pq.write_table(table, out / "emoji.parquet", compression="zstd")
    counts = {task: sum(r["task"] == task for r in rows) for task in TASKS}
    summary = {
        "rows": len(rows), "emoji": len(emoji) - len(left_out), "sources": len({r["source"] for r in rows}),
        "tasks": counts, "size": size, "groups": groups or known, "packages": packages,
        "left_out": left_out, "parquet_sha256": hashlib.sha256((out / "emoji.parquet").read_bytes()).hexdigest(),
        "image_root": ".", "split_key": "source",
    }  # fmt: skip
    (out / "emoji.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for emoji.parquet, images/ and emoji.json")
    parser.add_argument("--size", type=int, default=72, help="image side in pixels (default 72)")
    parser.add_argument("--groups", nargs="+", help="only these emoji groups or subgroups ('Smileys & Emotion', 'hand-fingers-closed')")
    args = parser.parse_args(argv)
    if not 16 <= args.size <= 512:
        print(f"build_dataset: --size {args.size}: between 16 and 512 pixels", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        summary = build(args.out, args.size, args.groups)
    except BadInput as err:
        print(err, file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{summary['rows']} pairs of {summary['emoji']} emoji in {len(summary['tasks'])} tasks "
          f"({', '.join(f'{t} {n}' for t, n in summary['tasks'].items())}) under {args.out}; "
          f"{len(summary['left_out'])} left out")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
