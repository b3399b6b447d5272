"""The HTTP service: the FastAPI application, its routes (one module per resource),
request intake, schemas, problem+json errors, auth, middleware, metrics, settings and the
uvicorn server.
"""
