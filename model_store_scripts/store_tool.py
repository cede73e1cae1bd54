"""Export, import and verify mlserve models.

    python -m model_store_scripts.store_tool verify [TAG ...]
    python -m model_store_scripts.store_tool export OUT_DIR [TAG ...]
    python -m model_store_scripts.store_tool import FILE.bentomodel [...]

``import`` verifies every file's sha256 after import and deletes a model that fails, so a
tampered archive never stays in the store. Exit status 1 means at least one model failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlserve.errors import MLServeError
from mlserve.store import list_models, open_model


def _tags(given: list[str]) -> list[str]:
    return given or [m.tag for m in list_models()]


def verify(tags: list[str]) -> int:
    failures = 0
    for tag in _tags(tags):
        try:
            model = open_model(tag, verify=True)
            print(f"ok      {tag}  ({len(model.metadata['files'])} files)")
        except MLServeError as exc:
            failures += 1
            print(f"FAILED  {tag}: {exc.message}")
    return 1 if failures else 0


def export(out_dir: Path, tags: list[str]) -> int:
    import bentoml

    out_dir.mkdir(parents=True, exist_ok=True)
    for tag in _tags(tags):
        open_model(tag, verify=True)  # never export a model that is already corrupt
        # Absolute: bentoml resolves a relative path against `/`, not the working directory.
        target = (out_dir / f"{tag.replace(':', '-')}.bentomodel").resolve()
        bentoml.models.export_model(tag, str(target))
        print(f"exported {tag} -> {target}")
    return 0


def import_(files: list[Path]) -> int:
    import bentoml

    failures = 0
    for file in files:
        model = bentoml.models.import_model(str(file.resolve()))  # absolute, as for export
        tag = str(model.tag)
        try:
            open_model(tag, verify=True)
            print(f"imported {tag} from {file} (checksums verified)")
        except MLServeError as exc:
            bentoml.models.delete(tag)
            failures += 1
            print(f"REFUSED  {file}: {exc.message}; removed {tag} from the store")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="store_tool", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_verify = sub.add_parser("verify", help="check every file's sha256")
    p_verify.add_argument("tags", nargs="*")
    p_export = sub.add_parser("export", help="write .bentomodel archives")
    p_export.add_argument("out_dir", type=Path)
    p_export.add_argument("tags", nargs="*")
    p_import = sub.add_parser("import", help="import archives and verify them")
    p_import.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "verify":
        return verify(args.tags)
    if args.cmd == "export":
        return export(args.out_dir, args.tags)
    return import_(args.files)


if __name__ == "__main__":
    sys.exit(main())
