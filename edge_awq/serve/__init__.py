"""The server behind ``edge-awq serve``: the Starlette app (``app.py``), the engine that runs one request at a
time (``engine.py``), OpenAI's request and response shapes (``openai_api.py``), the socket, uvicorn and the
request log (``server.py``), and systemd's notify protocol (``sdnotify.py``).
"""
