"""Does a category-subtree filter match the same rows on every Milvus engine the project runs?

``serving.filters`` turns ``category_prefix`` (a node of the category tree) into the node itself or a string range
of the paths below it (``path == node or (path >= "node > " and path < "node >!")``). LIKE patterns are recorded
beside it because engines disagree on them: Milvus 2.3 (the standalone server of the latency benchmark) reads
``_`` as itself and an escaped ``\\_`` as a backslash and ``_``; Milvus Lite 3 (the tests' engine), as newer
servers, reads ``_`` as a wildcard and ``\\_`` as ``_``. This loads a few category paths into a throwaway
collection on each engine and records, per node, the rows the current filter, an escaped LIKE pattern and a plain
one return against the node and the paths below it.

    make milvus-start && python benchmarks/filter_engines.py   # the standalone server and a Milvus Lite file

Writes benchmarks/results/filter_engines.json. Tests run the same probe on Milvus Lite
(``tests/test_serving.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import write_result  # noqa: E402
from serving.filters import Filters  # noqa: E402

COLLECTION = "prefix_filter_check"  # not one of the index lifecycle's (no collection prefix of ours)
PATHS = ["home_decor > vases", "homexdecor > vases", "home decor", "home", "home_", "homf", "hom", "home`x",
         "home > kitchen", "home > kitchen > mugs", "home > kitchenware", "home >", "home >!x", "home >=x",
         "home > ", "zebra", "z{", "z > a", "z{ > b", "art & craft", "art & craft > paper", "art &", "art 'n", "[x",
         "y"]
# Nodes beside awkward neighbours: "_" (a LIKE wildcard), a sibling that merely starts with the node ("home decor",
# "home > kitchenware", "art &"), "z" (+1 is "{"); below every node, the range ends at "node >!".
PREFIXES = ["home_", "home_decor", "home > kitchen", "home", "z", "art & craft", "art &"]


def in_subtree(path: str, node: str) -> bool:
    """What ``category_prefix=node`` promises: the node and every path below it."""
    return path == node or path.startswith(node + " > ")


def like_pattern(prefix: str, escape: bool) -> str:
    """The subtree as a LIKE pattern, with ``_`` and ``%`` escaped (``escape``) and without."""
    below = prefix + " > "
    pattern = below.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") if escape else below
    return f"(category_path == {json.dumps(prefix)} or category_path like {json.dumps(pattern + '%')})"


def matching_rows(client: object, expressions: dict[str, str]) -> dict[str, list[str] | str]:
    """Load ``PATHS`` into a throwaway collection and return each expression's rows, sorted (or the error)."""
    from pymilvus import DataType, MilvusClient

    if client.has_collection(COLLECTION):
        client.drop_collection(COLLECTION)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("product_id", DataType.INT64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=4)
    schema.add_field("category_path", DataType.VARCHAR, max_length=64)
    params = client.prepare_index_params()
    params.add_index(field_name="embedding", index_type="FLAT", metric_type="IP")
    client.create_collection(COLLECTION, schema=schema, index_params=params)
    try:
        client.insert(COLLECTION, [{"product_id": i, "embedding": [1.0, 0.0, 0.0, 0.0], "category_path": path}
                                   for i, path in enumerate(PATHS)])
        client.flush(COLLECTION)
        client.load_collection(COLLECTION)
        out: dict[str, list[str] | str] = {}
        for label, expr in expressions.items():
            try:
                rows = client.query(COLLECTION, filter=expr, output_fields=["category_path"])
                out[label] = sorted(row["category_path"] for row in rows)
            except Exception as exc:  # noqa: BLE001 - an engine that cannot parse the pattern: record why
                out[label] = f"error: {str(exc)[:160]}"
        return out
    finally:
        client.drop_collection(COLLECTION)


def probe(uri: str) -> dict:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    expressions = {}
    for prefix in PREFIXES:
        expressions[f"{prefix}|range"] = Filters(category_prefix=prefix).expression()
        expressions[f"{prefix}|like_escaped"] = like_pattern(prefix, escape=True)
        expressions[f"{prefix}|like_plain"] = like_pattern(prefix, escape=False)
    rows = matching_rows(client, expressions)
    cases = []
    for prefix in PREFIXES:
        want = sorted(path for path in PATHS if in_subtree(path, prefix))
        cases.append({"prefix": prefix, "expected": want, **{
            kind: {"expression": expressions[f"{prefix}|{kind}"], "rows": rows[f"{prefix}|{kind}"],
                   "exact": rows[f"{prefix}|{kind}"] == want} for kind in ("range", "like_escaped", "like_plain")}})
    return {"uri": uri, "server_version": client.get_server_version(), "cases": cases,
            **{f"{kind}_exact_for_every_prefix": all(c[kind]["exact"] for c in cases)
               for kind in ("range", "like_escaped", "like_plain")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--milvus-uri", action="append",
                        help="engines to probe (repeatable); default: the standalone server on 127.0.0.1:19530 "
                             "and a Milvus Lite file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        uris = args.milvus_uri or ["http://127.0.0.1:19530", str(Path(scratch) / "lite.db")]
        engines = [probe(uri) for uri in uris]
    for engine in engines:
        print(engine["server_version"], {k: v for k, v in engine.items() if k.endswith("every_prefix")})
    write_result("filter_engines", {"paths": PATHS, "engines": engines},
                 "make milvus-start && python benchmarks/filter_engines.py")


if __name__ == "__main__":
    main()
