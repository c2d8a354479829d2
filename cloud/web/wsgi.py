"""WSGI entry point for running the web tier under any WSGI server that supports flask-sock, e.g.::

    gunicorn --worker-class gthread --workers 2 --threads 64 -b 0.0.0.0:8000 cloud.web.wsgi:app

(``python -m cloud web`` does the same from IOT_* settings.) Each open WebSocket holds one worker thread.

Everything the app builds at start-up (modules, routes, SQLAlchemy metadata: ~100,000 objects) is moved out of
the garbage collector's view (``cloud.service.freeze_startup_heap``): a full collection then scans only what requests allocate, a few
thousand objects instead of the whole heap (a full collection of the unfrozen heap took ~80 ms, long enough to
show in the p99 of every request in flight). With ``--preload`` the frozen objects are also shared by the
forked workers instead of being copied on the collector's first write.
"""

from cloud.service import freeze_startup_heap
from cloud.settings import load
from cloud.web import create_app

app = create_app(load())
freeze_startup_heap()
