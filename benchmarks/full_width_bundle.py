"""Setup of the narrowing A/B: serve the production model *without* its serving projection.

``register`` saves the production bundle again as ``<version>-fullwidth`` — the same towers, text encoder
and boosting weights, no ``projection.npy`` (so 774-d vectors) — and points production at it;
``restore`` puts the production pointer back as ``register`` found it. Between the two, ``benchmarks/serving.py
--result serving_full_width`` measures the full-width vectors with everything else equal (the boosting
weights stay those fit on the narrowed vectors). It bypasses the validation gate on purpose: a
benchmark tool, never a step of the DAGs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from retrieval_core.settings import get_settings  # noqa: E402

SUFFIX = "-fullwidth"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["register", "restore"])
    args = parser.parse_args()

    from feature_repo.warehouse import EMBEDDINGS, copy_version
    from serving.bundle import registered_bundle_id
    from serving.refresh import production_bundle
    from training.export import register_model
    from training.gate import pointer_record, promote, read_pointer, restore_pointer

    settings = get_settings()
    models_dir = settings.artifacts_dir / "models"
    kept = models_dir / "production.before-full-width.json"  # the pointer `restore` puts back, as it was
    saved = read_pointer(models_dir)
    if saved is None:
        raise SystemExit(f"no production model in {models_dir}: run `uer train` first")
    version, metrics = pointer_record(saved)["version"], Path(pointer_record(saved)["metrics"])
    if args.action == "restore":
        if not kept.exists():
            raise SystemExit(f"nothing to restore: {kept} is missing (run `register` first)")
        if not version.endswith(SUFFIX):  # a promotion or rollback since `register`: putting it back would undo it
            raise SystemExit(f"production is {version}, not the full-width bundle: not restoring {kept}")
        restore_pointer(models_dir, kept.read_bytes())
        kept.unlink()
        print(f"production -> {pointer_record(read_pointer(models_dir))['version']}")
        return
    if version.endswith(SUFFIX):
        raise SystemExit(f"production is already {version}: run `restore` first")
    source = production_bundle(settings)  # the registration production names
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        shutil.copytree(source.path / "model", models / "model")
        boost = json.loads((source.path / "boost.json").read_text())
        boost.update(serving_dim=0)
        boost.pop("validation_top_100_kept", None)
        (models / "boost.json").write_text(json.dumps(boost, indent=2))
        encoder = source.path / "text_encoder"
        tag = register_model(settings, version + SUFFIX, models, encoder if encoder.exists() else None)
    target = registered_bundle_id(settings, version + SUFFIX, tag)
    try:  # the same encodings, as its export would write them
        copy_version(settings, EMBEDDINGS, source.bundle_id, target)
    except LookupError:  # exported before rows were keyed by bundle
        copy_version(settings, EMBEDDINGS, version, target)
    kept.write_bytes(saved)
    promote(models_dir, version + SUFFIX, metrics, {"bundle_id": target})
    print(f"registered {tag}; production -> {version + SUFFIX}")


if __name__ == "__main__":
    main()
