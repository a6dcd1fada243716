"""Benchmark: the text-encoding cache (``training.text_encoder.EmbeddingCache``) at catalogue scale.

A refresh encodes only new or changed product text (``serving.refresh.with_version_encodings``): it opens
the model version's cache, looks every product's current text up, encodes what is missing and saves the
cache. For N distinct title-like texts with 384-d vectors (MiniLM's width), each size in a fresh process:

* ``fill_s``: encode all N into an empty cache and save it (what a training run's text step does once);
* ``open_s``: open the saved cache (read it from disk);
* ``lookup_all_s``: look all N up, every one cached (hash, dictionary, stack);
* ``one_change_s``: one text changed: encode it and save the cache (a nightly refresh with one edited title);
* ``file_mb``, ``peak_rss_mb`` (the process's peak resident memory) and ``rss_after_import_mb`` (the same,
  before the cache's work: what importing the module costs).

The encoder is a stand-in returning seeded random vectors: what is measured is the cache's own cost, not
MiniLM's (``benchmarks/text_encoding.py`` measures that).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

DIM = 384


def _stand_in_encoder(texts: list[str]) -> np.ndarray:
    return np.random.default_rng(len(texts)).standard_normal((len(texts), DIM), dtype=np.float32)


def measure(n: int, workdir: Path) -> dict[str, float]:
    """The figures of one size, in this process (run it in a fresh one for a clean peak RSS)."""
    from training.text_encoder import EmbeddingCache

    imported_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch & co. come with the module
    texts = [f"handmade walnut serving bowl {i} carved by hand oiled finish" for i in range(n)]
    path = workdir / f"cache-{n}.parquet"
    start = time.perf_counter()
    EmbeddingCache(path, "bench").encode(texts, _stand_in_encoder)
    fill = time.perf_counter() - start
    start = time.perf_counter()
    cache = EmbeddingCache(path, "bench")
    opened = time.perf_counter() - start
    start = time.perf_counter()
    vectors, new = cache.encode(texts, _stand_in_encoder)
    lookup = time.perf_counter() - start
    assert new == 0 and vectors.shape == (n, DIM)
    texts[0] += " now in oak"
    start = time.perf_counter()
    _, new = cache.encode(texts, _stand_in_encoder)
    one_change = time.perf_counter() - start
    assert new == 1
    return {"products": n, "fill_s": round(fill, 3), "open_s": round(opened, 3), "lookup_all_s": round(lookup, 3),
            "one_change_s": round(one_change, 3), "file_mb": round(path.stat().st_size / 2**20, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_after_import_mb": round(imported_rss, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,200000,1000000", help="catalogue sizes, comma-separated")
    parser.add_argument("--result", default="encoding_cache", help="result file name (benchmarks/results/<name>.json)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size, print JSON
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.workdir)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for n in (int(size) for size in args.sizes.split(",")):
            out = subprocess.run([sys.executable, __file__, "--one", str(n), "--workdir", workdir],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    write_result(args.result, {"dim": DIM, "encoder": "stand-in (seeded random vectors)", "sizes": rows},
                 command="python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
