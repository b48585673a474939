"""Real English text that ships with every Debian/Ubuntu machine (base-files' licences).

Used for fidelity checks on real weights and for training the small GPT-2: no
download, the same text on every box.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.errors import BadRequest

LICENSE_DIR = Path("/usr/share/common-licenses")


def license_text(directory: Path = LICENSE_DIR) -> str:
    """All licence texts, concatenated in name order (symlinked aliases skipped)."""
    files = sorted(p for p in directory.glob("*") if p.is_file() and not p.is_symlink())
    if not files:
        raise BadRequest(f"no English text found under {directory} (Debian's base-files provides it)")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def english_sentences(limit: int, directory: Path = LICENSE_DIR, min_words: int = 6, max_words: int = 60) -> list[str]:
    """Up to ``limit`` distinct real sentences of ``min_words``..``max_words`` words."""
    flat = re.sub(r"\s+", " ", license_text(directory))
    seen: set[str] = set()
    out: list[str] = []
    for raw in re.split(r"(?<=[.!?])\s+", flat):
        sentence = raw.strip()
        words = sentence.split()
        letters = sum(ch.isalpha() for ch in sentence)
        if not (min_words <= len(words) <= max_words) or letters < 0.7 * len(sentence.replace(" ", "")):
            continue
        if sentence.lower() in seen:
            continue
        seen.add(sentence.lower())
        out.append(sentence)
        if len(out) >= limit:
            break
    return out


def passages(limit: int, words: int, directory: Path = LICENSE_DIR) -> list[str]:
    """Up to ``limit`` consecutive, non-overlapping passages of ``words`` words."""
    tokens = re.sub(r"\s+", " ", license_text(directory)).split(" ")
    out = [" ".join(tokens[i : i + words]) for i in range(0, len(tokens) - words, words)]
    return out[:limit]
