"""The browser viewer: a local server over one or more stores, and a static HTML export."""

from vieval_runner.viewer.export import export_html
from vieval_runner.viewer.server import ViewerServer, serve

__all__ = ["ViewerServer", "export_html", "serve"]
