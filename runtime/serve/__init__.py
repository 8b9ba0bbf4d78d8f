"""The OpenAI-compatible server: `run-model ARCH --serve` or `run-model serve MODEL`.

    protocol.py       request bodies, their validation (all of it), OpenAI error objects
    engine_client.py  the engine on its own thread; per-request mailboxes that keep only the newest output
    serving.py        what both endpoints share: the served model, off-loop tokenizing, the response loop
    completions.py    /v1/completions
    chat.py           /v1/chat/completions (the package's renderer or chat template, its reasoning parser)
    render.py         choice text, stream deltas and logprobs as the client sees them
    app.py            routes, authentication, start-up report, graceful stop"""
from runtime.serve.app import ServerOptions, bind_socket, build_app, serve

__all__ = ["ServerOptions", "bind_socket", "build_app", "serve"]
