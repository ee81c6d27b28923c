"""The web interface: pages and a JSON API for running and watching the farm from a browser.

No bpy here: the headless server and the add-on's server thread both start it on the farm
server's own event loop with start_web().
"""

from .app import DEFAULT_MAX_UPLOAD_BYTES, WebServer, start_web
from .errors import WebError

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "WebError", "WebServer", "start_web"]
