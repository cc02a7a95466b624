"""The app factory: routes, limits and error handling around one open Index, and a runner for it."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..index import Index
from . import api, files, page
from .middleware import BodyLimit, SecurityHeaders
from .state import ServeConfig, ServeState

__all__ = ["ServeConfig", "create_app", "run"]


def create_app(index: Index, config: ServeConfig | None = None) -> FastAPI:
    """A FastAPI app serving `index`: the JSON API under /api, images by item id, the page at /.

    The caller keeps ownership of `index` (the app never closes it). /openapi.json describes the
    API; the interactive /docs page is off, since it loads its script from a CDN.
    """
    app = FastAPI(title="mmrag", summary="Search an mmrag index by text, by image, or by example.",
                  docs_url=None, redoc_url=None)
    app.state.mmrag = ServeState(index, config or ServeConfig())
    app.include_router(api.router)
    app.include_router(files.router)
    app.include_router(page.router)
    app.mount("/static", page.static_files(), name="static")
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(BodyLimit, max_bytes=app.state.mmrag.config.max_upload_bytes)
    app.add_middleware(SecurityHeaders)  # added last, so outermost: it sees BodyLimit's early 413 too
    return app


def run(index: Index, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None) -> None:
    """Serve `index` with uvicorn until interrupted (what `mmrag serve` runs)."""
    import uvicorn

    uvicorn.run(create_app(index, config), host=host, port=port, log_level="info")


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with every problem in one line: `body.k: Input should be less than or equal to 100`."""
    problems = "; ".join(f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors())
    return JSONResponse({"error": problems or "invalid request"}, status_code=422)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A JSON 500 without internals; uvicorn logs the traceback."""
    return JSONResponse({"error": "internal server error; the server log has the details"}, status_code=500)
