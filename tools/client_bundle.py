"""Build the render-client bundle: a zip to copy to render nodes that have only a stock Blender.

    python -m tools.client_bundle [--out dist/] [--folder]

Prints the path of dist/microfarm-client-<version>.zip (with --folder: of dist/microfarm-client, unpacked).
The builder itself is server_addon.core.client_bundle, which the farm's web page and the add-on use too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server_addon.core.client_bundle import BundleError, build_bundle, build_zip, bundle_entries, zip_bytes, zip_name

__all__ = ["BundleError", "build_bundle", "build_zip", "bundle_entries", "main", "zip_bytes", "zip_name"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.client_bundle", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("dist"), help="where to write it (default: dist/)")
    parser.add_argument("--folder", action="store_true", help="write the unpacked folder instead of the zip")
    args = parser.parse_args(argv)
    try:
        path = build_bundle(args.out) if args.folder else build_zip(args.out)
    except (BundleError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
