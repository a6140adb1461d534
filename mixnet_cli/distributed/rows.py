"""The result row of both routes (Ray and Spark): its Arrow schema (and Spark's DDL of it), a
:class:`~mixnet_cli.results.ClassificationResult` as a row, and the input's canonical key that resumption matches
on."""

from __future__ import annotations

import os
import posixpath
from typing import TYPE_CHECKING, Any, Mapping, Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

from ..images.inputs import display_name, is_url
from .extra import _import_pyarrow

if TYPE_CHECKING:
    import pyarrow

    from ..classifier import ClassificationResult


def result_schema() -> "pyarrow.Schema":
    """The Arrow schema of a result row: the JSON object of ``mixnet classify`` plus ``key`` (see
    :func:`canonical_key`), with nulls for the part a row does not have. Scores are float64: the exact Python float
    the JSON output prints, bit for bit."""
    pa = _import_pyarrow()
    prediction = pa.struct([("class_id", pa.int64()), ("label", pa.string()), ("score", pa.float64())])
    error = pa.struct([("type", pa.string()), ("message", pa.string())])
    return pa.schema([
        pa.field("input", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("architecture", pa.string(), nullable=False),
        pa.field("predictions", pa.list_(prediction)),
        pa.field("error", error),
    ])


# The same schema in Spark's DDL, for DataFrame.mapInArrow (pyspark is not imported for it).
SPARK_SCHEMA = ("input string, key string, model string, architecture string, "
                "predictions array<struct<class_id: bigint, label: string, score: double>>, "
                "error struct<type: string, message: string>")


def result_row(result: "ClassificationResult", key: str | None = None) -> dict[str, Any]:
    """One result as a row of :func:`result_schema`: :meth:`ClassificationResult.to_dict` with both optional
    keys, and ``key`` (default: :func:`canonical_key` of the input's name)."""
    row = result.to_dict()
    return {"input": row["input"], "key": key if key is not None else canonical_key(row["input"]),
            "model": row["model"], "architecture": row["architecture"], "predictions": row.get("predictions"),
            "error": row.get("error")}


def results_table(rows: Sequence[Mapping[str, Any]]) -> "pyarrow.Table":
    return _import_pyarrow().Table.from_pylist(list(rows), schema=result_schema())


def is_uri(source: str) -> bool:
    """A path pyarrow opens through a filesystem of its own (``s3://``, ``gs://``, ``hdfs://``, ``file://``...);
    http(s) URLs are read as ``mixnet classify`` reads them."""
    return "://" in source and not is_url(source)


def canonical_key(name: str) -> str:
    """The one spelling of an input that resumption matches on: a local path made absolute and normalised
    (``data/./a.jpg`` run from ``/srv`` and ``/srv/data/a.jpg`` are one key; symbolic links are not resolved, as
    that would cost a look at the disk per input); a ``file://`` URI as its local path; any other URI or URL as
    given, with the scheme (and an http host) in lower case, repeated slashes, ``.`` and ``..`` removed from its
    path. Not UTF-8 bytes of a file name are escaped as in :func:`~mixnet_cli.images.inputs.display_name`."""
    if "://" in name:
        parts = urlsplit(name)
        scheme = parts.scheme.lower()
        path = parts.path
        if path:
            trailing = "/" if path.endswith("/") and path.strip("/") else ""
            path = posixpath.normpath("/" + path.lstrip("/")) + trailing
            path = "" if path == "/" and not parts.path.startswith("/") else path
        if scheme == "file":
            return display_name(os.path.normpath(unquote(path or "/")))
        netloc = parts.netloc.lower() if scheme in ("http", "https") else parts.netloc
        return display_name(urlunsplit((scheme, netloc, path, parts.query, parts.fragment)))
    return display_name(os.path.normpath(os.path.abspath(os.path.expanduser(name))))
