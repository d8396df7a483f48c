"""The OpenAI-compatible HTTP server: `qwenkit serve`.

protocol (request/response schemas) -> params (request -> SamplingParams) and chat_prompt/react (messages and
tools -> prompt ids, model text -> tool calls) -> engine (continuous batching on one KV cache, worker thread)
-> completions/app (routes, SSE, auth, limits, errors) -> run (load the model, start uvicorn).

This package is the only place that imports fastapi/uvicorn (the `server` extra); `import qwenkit` never does.
Nothing is imported here, so `qwenkit.server.engine` works without the web stack.
"""
