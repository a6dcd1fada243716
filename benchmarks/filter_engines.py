"""Does a category-prefix filter match the same rows on every Milvus engine the project runs?

``serving.filters`` turns ``category_prefix`` into a string range (``path >= prefix and path < prefix'``).
It used to be a LIKE pattern with ``_`` escaped, and engines disagree on LIKE: Milvus 2.3 (the standalone
server of the latency benchmark) reads ``_`` as itself and an escaped ``\\_`` as a backslash and ``_``;
Milvus Lite 3 (the tests' engine), as newer servers, reads ``_`` as a wildcard and ``\\_`` as ``_``. This
loads a few category paths into a throwaway collection on each engine and records, per prefix, the rows the
current filter, the old escaped pattern and a plain pattern return against the paths that start with it.

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
PATHS = ["home_decor > vases", "homeXdecor > vases", "home decor", "home", "home_", "homf", "hom", "home`x",
         "home > kitchen", "home > kitchen > mugs", "home > kitchenware", "home >", "home!x", "zebra", "z{",
         "art & craft", "art &", "art 'n", "art '", "Zed", "Z", "[x", "Y"]
# Prefixes whose last character sits beside an awkward neighbour: "_" (a LIKE wildcard), "&" (+1 is a quote),
# "Z" (+1 is "["), " " (+1 is "!"), "z" (+1 is "{").
PREFIXES = ["home_", "home_decor > v", "home > kitchen", "home", "home ", "z", "art &", "Z"]


def old_like(prefix: str, escape: bool) -> str:
    """The LIKE filter of before (``escape``) and the same without escaping ``_``."""
    pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") if escape else prefix
    return f"category_path like {json.dumps(pattern + '%')}"


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
        expressions[f"{prefix}|like_escaped"] = old_like(prefix, escape=True)
        expressions[f"{prefix}|like_plain"] = old_like(prefix, escape=False)
    rows = matching_rows(client, expressions)
    cases = []
    for prefix in PREFIXES:
        want = sorted(path for path in PATHS if path.startswith(prefix))
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
