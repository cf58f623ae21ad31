"""Versioned JSON Schemas for every JSON document Toto writes, and the one way to check them.

Each document carries ``"schema": "<kind>"`` and ``"version": <int>``; the schema for it lives in
``schemas/<kind>.v<version>.json`` (JSON Schema draft 2020-12). Readers call :func:`validate`,
which refuses a document of a version this Toto does not know with an error that says what to do.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_DIR = Path(__file__).resolve().parent
_FILE_RE = re.compile(r"^(?P<kind>[a-z0-9_]+)\.v(?P<version>\d+)\.json$")


class SchemaError(ValueError):
    """A JSON document does not match its schema, or has a kind/version this Toto cannot read."""


@functools.cache
def _catalogue() -> dict[str, dict[int, Path]]:
    out: dict[str, dict[int, Path]] = {}
    for p in SCHEMA_DIR.glob("*.json"):
        m = _FILE_RE.match(p.name)
        if m:
            out.setdefault(m["kind"], {})[int(m["version"])] = p
    return out


def kinds() -> list[str]:
    """All document kinds with a schema."""
    return sorted(_catalogue())


def versions(kind: str) -> list[int]:
    """The versions of ``kind`` this Toto can read, oldest first."""
    if kind not in _catalogue():
        raise SchemaError(f"unknown document kind {kind!r}; known kinds: {', '.join(kinds())}")
    return sorted(_catalogue()[kind])


def current_version(kind: str) -> int:
    """The version this Toto writes for ``kind``."""
    return versions(kind)[-1]


@functools.cache
def _validator(kind: str, version: int) -> jsonschema.protocols.Validator:
    schema = json.loads(_catalogue()[kind][version].read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate(doc: Any, kind: str, *, source: str | None = None) -> dict:
    """Check ``doc`` against the schema of its kind and version; return it unchanged.

    ``source`` (a path or URL) is only used to make error messages point at the file.
    """
    where = f" in {source}" if source else ""
    if not isinstance(doc, dict):
        raise SchemaError(f"expected a JSON object of kind {kind!r}{where}, got {type(doc).__name__}")
    got_kind = doc.get("schema")
    if got_kind != kind:
        raise SchemaError(
            f"expected a document of kind {kind!r}{where} but its \"schema\" field is {got_kind!r}; "
            "check that you passed the right file"
        )
    version = doc.get("version")
    known = versions(kind)
    if not isinstance(version, int) or isinstance(version, bool):
        raise SchemaError(f"{kind} document{where} has no integer \"version\" field (got {version!r})")
    if version not in known:
        newer = version > known[-1]
        hint = (
            "it was written by a newer Toto: upgrade Toto (pip install -U toto) to read it"
            if newer
            else "it was written by an older Toto whose format is no longer read: rebuild it with this "
            "version (e.g. `toto-pipeline status OUT --rebuild-manifest` for manifests, or rerun the job)"
        )
        raise SchemaError(
            f"{kind} document{where} has version {version}, but this Toto reads versions "
            f"{', '.join(map(str, known))}; {hint}"
        )
    errors = sorted(_validator(kind, version).iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors[:5]:
            path = "/".join(str(p) for p in e.absolute_path) or "(top level)"
            lines.append(f"  at {path}: {e.message}")
        more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise SchemaError(f"invalid {kind} v{version} document{where}:\n" + "\n".join(lines) + more)
    return doc


def new_document(kind: str, **fields: Any) -> dict:
    """A document of ``kind`` at the current version (not validated until written)."""
    return {"schema": kind, "version": current_version(kind), **fields}


def canonical_json(doc: Any) -> bytes:
    """The byte form used for hashing and writing: sorted keys, no insignificant whitespace."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def content_hash(doc: dict, *, exclude: tuple[str, ...] = ("content_hash",)) -> str:
    """sha256 of the canonical JSON of ``doc`` without the ``exclude`` keys."""
    body = {k: v for k, v in doc.items() if k not in exclude}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def with_content_hash(doc: dict) -> dict:
    """A copy of ``doc`` with its ``content_hash`` field set."""
    out = copy.deepcopy(doc)
    out["content_hash"] = content_hash(out)
    return out
