"""Entry point of the render client.

    python -m client --server HOST:PORT --name NAME                       (PyPI bpy)
    blender --background --python client/__main__.py -- --server HOST:PORT --name NAME

In the render-client bundle (server_addon.core.client_bundle) this file sits in
microfarm-client/client/, next to vendor/ with pure-Python msgpack, zeroconf and ifaddr.
"""

import os
import sys

#: Told to the user when a stock Blender's Python lacks the packages: where the bundle comes from.
GET_BUNDLE = ("run the render client from the MicroFarm client bundle: download microfarm-client.zip from the "
              "farm's web page (http://FARM:WEBPORT/client/microfarm-client.zip), use Save Render Client in the "
              "add-on's panel, or run `python -m tools.client_bundle` in the MicroFarm repository; unzip it and run "
              "blender --background --python microfarm-client/client/__main__.py -- --name NAME")

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:
    # Run as a script by Blender: make the bundle (or the repository) importable so `client` and `protocol` resolve.
    sys.path.insert(0, _root)
if os.path.isdir(os.path.join(_root, "vendor")):
    # The bundle's vendored packages come first, so that they win over any other copies.
    sys.path.insert(0, os.path.join(_root, "vendor"))


def _arguments() -> list[str]:
    # Inside Blender, our arguments are the ones after "--"; with plain Python, all of them.
    if "--" in sys.argv:
        return sys.argv[sys.argv.index("--") + 1:]
    return sys.argv[1:]


def _missing_packages() -> str | None:
    """The packages the client cannot do without that this Python lacks, or None."""
    missing = []
    for name in ("msgpack", "zeroconf"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return " and ".join(missing) or None


if __name__ == "__main__":
    _missing = _missing_packages()
    if _missing:
        print(f"error: this Python ({sys.executable}) has no {_missing}; {GET_BUNDLE}", file=sys.stderr, flush=True)
        sys.exit(2)
    from client.app import main
    from client.finish import exit_process

    exit_process(main(_arguments()))
