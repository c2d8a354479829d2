"""WSGI entry point for running the web tier under any WSGI server that supports flask-sock, e.g.::

    gunicorn --worker-class gthread --workers 2 --threads 64 -b 0.0.0.0:8000 cloud.web.wsgi:app

(``python -m cloud web`` does the same from IOT_* settings.) Each open WebSocket holds one worker thread.
"""

from cloud.settings import load
from cloud.web import create_app

app = create_app(load())
