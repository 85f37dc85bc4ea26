"""An OpenAI-compatible HTTP server over the continuous-batching engine (`python -m bluelm_jax serve`).

    schema.py    request bodies -> validated options; OpenAI-style errors with their HTTP status
    tools.py     BlueLM's function-calling format <-> OpenAI `tools` / `tool_calls`
    scoring.py   log-probabilities of a token sequence (the library's scoring.py) and token texts (completions)
    metrics.py   the Prometheus metrics
    app.py       the FastAPI application: routes, streaming, API key, disconnects
    serve.py     the `serve` command: load, engine, compilation cache, uvicorn

FastAPI, uvicorn, sse-starlette and prometheus-client come with the `serve` extra.
"""
