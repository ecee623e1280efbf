"""`sam2rt serve`: a Roboflow-Inference-compatible SAM 2 HTTP server (FastAPI + uvicorn, the `serve` extra).

The wire contract is ../shared/spec/roboflow-sam2-api.md; the real `inference-sdk` client works against it
unchanged. Import `sam2rt.serve.app.create_app` to embed the server; `sam2rt serve` runs it.
"""
