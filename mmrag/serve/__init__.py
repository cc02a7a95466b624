"""Serve an index over HTTP: a JSON API and a search page, for people and programs on the network.

    from mmrag import Index
    from mmrag.serve import ServeConfig, create_app

    index = Index.open("photos.mmrag")
    app = create_app(index, ServeConfig(api_key="..."))   # a FastAPI app: run it or mount it

`mmrag serve --index DIR` does the same and runs it with uvicorn (docs/serve.md). Needs the
`serve` extra: `pip install 'mmrag[serve]'`.
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import python_multipart  # noqa: F401  (FastAPI's form and upload parser)
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"mmrag.serve needs FastAPI, uvicorn and python-multipart ({exc.name} is missing); "
        "install them with pip install 'mmrag[serve]'"
    ) from exc

from .app import ServeConfig, create_app, run

__all__ = ["ServeConfig", "create_app", "run"]
