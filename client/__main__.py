"""Entry point of the render client.

    python -m client --server HOST:PORT --name NAME                       (PyPI bpy)
    blender --background --python client/__main__.py -- --server HOST:PORT --name NAME
"""

import os
import sys

if not __package__:
    # Run as a script by Blender: make the repository importable so `client` and `protocol` resolve.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from client.app import main  # noqa: E402


def _arguments() -> list[str]:
    # Inside Blender, our arguments are the ones after "--"; with plain Python, all of them.
    if "--" in sys.argv:
        return sys.argv[sys.argv.index("--") + 1:]
    return sys.argv[1:]


if __name__ == "__main__":
    sys.exit(main(_arguments()))
