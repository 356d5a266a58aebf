"""Serving: a web page and an HTTP API over a run's model (``imgcls serve``).

    app.py       create_app: the routes and their answers; serve and its socket
    guard.py     the ASGI guard (API key, body size, slow clients) and request metrics
    uploads.py   uploaded bytes to pixels, with the limits that protect the server
    state.py     what one app holds: model, micro-batcher, explanations, metrics, model card
    errors.py    the error answers; schemas.py the API's schemas; batching.py micro-batching
    http.py      the HTTP connection: headers that must arrive in time; CONTRACT.md the API's promises; static/ the page
"""
