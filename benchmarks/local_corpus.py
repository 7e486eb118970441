"""English text already on this machine, split by package into held-out and training text (no download).

Documents, each with a *group* (the package it belongs to):

- ``metadata``: site-packages/*.dist-info/METADATA long descriptions (package READMEs)
- ``npm``: /usr/lib/node_modules/**/*.md over 2 KB
- ``nodedoc``: /usr/share/doc/nodejs/api/*.md (the Node.js API manual)
- ``debdoc``: /usr/share/doc/<pkg>/{README*,NEWS*,*.md,*.txt,*.rst}[.gz]
- ``changelog``: /usr/share/doc/<pkg>/changelog*.gz (Debian and upstream changelogs)
- ``cmake``: the CMake manual's .rst files; ``licenses``: /usr/share/common-licenses

Groups are normalised (python3-httplib2 and httplib2 are one group) and documents deduplicated by content. A group
is held out when sha1("heldout:" + group) % 8 == 0. The held-out text is shuffled documents (seed 0), each cut at
5,000 characters, until the token quotas (prose, changelogs) are met, joined by blank lines into one file. The
training documents (every other group; seed 1 order) lose any document containing a held-out paragraph verbatim.
What is on a machine varies, so the counts are written beside the text (stats.json).
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import random
import re
import sysconfig
from pathlib import Path

SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])


def read(path) -> str:
    """A file's text (gzip too); empty for a binary or unreadable file."""
    path = str(path)
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = Path(path).read_bytes()
    except OSError:
        return ""
    if b"\x00" in raw[:4096]:
        return ""
    return raw.decode("utf-8", errors="replace")


def norm_group(name: str) -> str:
    """One group for a package's Debian and wheel names (python3-httplib2 and httplib2)."""
    name = name.lower().replace("_", "-")
    name = re.sub(r"^(python3?-|lib|node-)", "", name)
    name = re.sub(r"[-.]?\d[\d.\-a-z]*$", "", name)  # version suffixes: gcc-12-base -> gcc, libssl3 -> ssl
    return name or "unknown"


def clean(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    lines = [line for line in lines if not line.lstrip().startswith(("[![", "<img", "![", ".. image::", ".. |"))]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text


def english_like(text: str) -> bool:
    letters = sum(c.isalpha() for c in text)
    ascii_letters = sum(c.isascii() and c.isalpha() for c in text)
    return len(text) >= 500 and letters >= 0.55 * len(text) and ascii_letters >= 0.95 * max(letters, 1)


def documents():
    """(source, group, path, text) of every local document, in a fixed order."""
    for meta in sorted(SITE_PACKAGES.glob("*.dist-info/METADATA")):
        text = read(meta)
        body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
        name = re.search(r"^Name: (.+)$", text, re.M)
        if name and name.group(1).strip() == "odegpt":  # the project itself (editable install: changes over time)
            continue
        yield "metadata", norm_group(name.group(1) if name else meta.parent.name.split("-")[0]), str(meta), body
    for path in sorted(glob.glob("/usr/lib/node_modules/**/*.md", recursive=True)):
        if os.path.getsize(path) < 2000:
            continue
        parts = Path(path).parts
        pkg = [p for i, p in enumerate(parts) if i > 0 and parts[i - 1] == "node_modules"]
        if pkg and pkg[-1].startswith("@") and len(parts) > parts.index(pkg[-1]) + 1:
            pkg[-1] = pkg[-1] + "/" + parts[parts.index(pkg[-1]) + 1]
        yield "npm", "npm:" + norm_group(pkg[-1] if pkg else "npm"), path, read(path)
    for path in sorted(glob.glob("/usr/share/doc/nodejs/api/*.md")):
        yield "nodedoc", "nodejs-api:" + Path(path).stem, path, read(path)
    for pkg_dir in sorted(glob.glob("/usr/share/doc/*/")):
        pkg = Path(pkg_dir).name
        if pkg == "nodejs":
            continue
        for path in sorted(glob.glob(pkg_dir + "**/*", recursive=True)):
            name = Path(path).name
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            low = name.lower()
            if low.startswith("changelog"):
                if low.endswith(".gz"):
                    yield "changelog", norm_group(pkg), path, read(path)
            elif low.startswith(("readme", "news")) or re.search(r"\.(md|txt|rst|markdown)(\.gz)?$", low):
                if "copyright" not in low and "symbols" not in low:
                    yield "debdoc", norm_group(pkg), path, read(path)
    for path in sorted(glob.glob("/usr/share/cmake-3.25/Help/**/*.rst", recursive=True)):
        yield "cmake", "cmake:" + Path(path).parent.name, path, read(path)
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(path) and not os.path.islink(path):
            yield "licenses", "licenses", path, read(path)


def held_out(source: str, group: str) -> bool:
    """A whole group (package) is held out or not: no package is in both texts."""
    if source in ("licenses", "cmake"):
        return False
    return int(hashlib.sha1(("heldout:" + group).encode()).hexdigest(), 16) % 8 == 0


def build(output: Path, tokenizer_dir: str | Path, prose_tokens: int = 27000, changelog_tokens: int = 8000) -> dict:
    """Write ``eval.txt`` (held out), ``train.jsonl`` and ``stats.json`` into ``output``; return the stats."""
    from data_pipeline.tokenizer import load_tokenizer

    output.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_dir)  # never runs the model folder's code
    seen, held, training = set(), [], []
    for source, group, path, text in documents():
        text = clean(text)
        if not english_like(text):
            continue
        key = hashlib.sha1(re.sub(r"\s+", " ", text).encode()).hexdigest()
        if key not in seen:
            seen.add(key)
            (held if held_out(source, group) else training).append(
                {"group": group, "source": source, "path": path, "text": text})
    random.Random(0).shuffle(held)
    quota = {"prose": prose_tokens, "changelog": changelog_tokens}
    pieces, held_docs = [], []
    for doc in held:
        kind = "changelog" if doc["source"] == "changelog" else "prose"
        if quota[kind] <= 0:
            continue
        piece = doc["text"][:5000]
        tokens = len(tokenizer(piece, add_special_tokens=False)["input_ids"])
        quota[kind] -= tokens
        pieces.append(piece)
        held_docs.append({"group": doc["group"], "source": doc["source"], "path": doc["path"], "tokens": tokens})
        if all(q <= 0 for q in quota.values()):
            break
    held_text = "\n\n".join(pieces)
    paragraphs = {p.strip() for p in held_text.split("\n\n") if len(p.strip()) >= 200}
    random.Random(1).shuffle(training)
    kept = [{"group": doc["group"], "source": doc["source"],
             "text": doc["text"][:10000 if doc["source"] == "changelog" else 30000]}
            for doc in training if not any(p in doc["text"] for p in paragraphs)]
    (output / "eval.txt").write_text(held_text)
    with open(output / "train.jsonl", "w") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in kept)
    stats = {"held_out_documents": held_docs, "held_out_tokens": sum(d["tokens"] for d in held_docs),
             "training_documents": len(kept), "dropped_for_overlap": len(training) - len(kept),
             "training_characters": sum(len(d["text"]) for d in kept)}
    (output / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats
