"""The LangChain bridge and the agent API, on the real default tower, real photos and real Qdrant.

Includes langchain-tests' standard retriever and embeddings suites.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("langchain_core", reason="needs the langchain extra: pip install 'mmrag[langchain]'")
pytest.importorskip("langchain_tests", reason="needs langchain-tests (in the dev extra)")
from langchain_core.documents import Document  # noqa: E402
from langchain_core.language_models.fake_chat_models import FakeListChatModel  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import RunnableLambda  # noqa: E402

from mmrag import Index  # noqa: E402
from mmrag.agent import SEARCH_TOOL_SCHEMA, ImageFetchError, resolve_query, search_tool, tool_schema  # noqa: E402
from mmrag.integrations.langchain import (  # noqa: E402
    MultimodalEmbeddings,
    MultimodalRetriever,
    maximal_marginal_relevance,
    stored_vectors,
)

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = {
    "cat_chelsea.jpg": ("a ginger cat looking to the side", "dev"),
    "rocket_launch.jpg": ("a rocket lifting off with a bright plume", "dev"),
    "coffee_cup.jpg": ("a cup of coffee on a saucer", "train"),
    "astronaut.jpg": ("an astronaut in a white suit with a flag", "train"),
}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, sample_photos) -> Path:
    """The sample photos plus a captions.jsonl captioning four of them, with a `split`."""
    folder = tmp_path_factory.mktemp("lc_photos")
    for photo in sample_photos:
        shutil.copy(photo, folder / photo.name)
    with open(folder / "captions.jsonl", "w") as f:
        for name, (caption, split) in CAPTIONS.items():
            f.write(json.dumps({"image": name, "captions": [caption], "split": split}) + "\n")
    return folder


@pytest.fixture(scope="module")
def index(tmp_path_factory, encoder, photo_dir):
    index = Index.open(tmp_path_factory.mktemp("lc_index") / "x", encoder)
    report = index.add(photo_dir, progress=False)
    assert report.added == 10
    yield index
    index.close()


@pytest.fixture(scope="module")
def photo_server(photo_dir):
    """A local http.server on 127.0.0.1 serving the photo folder; stopped after the module."""
    handler = functools.partial(QuietHandler, directory=str(photo_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def ids(docs: list[Document]) -> list[str]:
    return [doc.metadata["id"] for doc in docs]


def names(docs: list[Document]) -> list[str]:
    return [Path(doc.metadata["source"]).name for doc in docs]


# -- langchain-tests' standard suites --------------------------------------------------------------

from langchain_tests.integration_tests import EmbeddingsIntegrationTests, RetrieversIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import EmbeddingsUnitTests  # noqa: E402


# The suites' async tests need an async runner; anyio's mark (anyio ships with langchain-core)
# runs them on asyncio and leaves the sync tests alone, which pytest-asyncio's strict mark does not.
@pytest.mark.anyio
class TestRetrieverStandard(RetrieversIntegrationTests):
    @pytest.fixture(autouse=True, scope="class")
    def _index(self, request, index):
        request.cls.index = index

    @property
    def retriever_constructor(self) -> type[MultimodalRetriever]:
        return MultimodalRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"index": self.index, "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "a cat"


class _EmbeddingsParams:
    @pytest.fixture(autouse=True, scope="class")
    def _encoder(self, request, encoder):
        request.cls.encoder = encoder

    @property
    def embeddings_class(self) -> type[MultimodalEmbeddings]:
        return MultimodalEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"encoder": self.encoder}


class TestEmbeddingsUnitStandard(_EmbeddingsParams, EmbeddingsUnitTests):
    pass


@pytest.mark.anyio
class TestEmbeddingsIntegrationStandard(_EmbeddingsParams, EmbeddingsIntegrationTests):
    pass


# -- the retriever ---------------------------------------------------------------------------------

def test_documents_hold_caption_and_metadata(index):
    docs = MultimodalRetriever(index=index, k=3).invoke("a cat")
    assert names(docs)[0] == "cat_chelsea.jpg"
    top = docs[0]
    assert top.page_content == "a ginger cat looking to the side"
    assert top.id == top.metadata["id"]
    assert top.metadata["modality"] == "image" and top.metadata["payload"]["split"] == "dev"
    assert Path(top.metadata["source"]).is_file()
    scores = [d.metadata["score"] for d in docs]
    assert scores == sorted(scores, reverse=True)
    assert "image_base64" not in top.metadata  # referenced by URI unless asked


def test_inline_images_is_opt_in(index):
    doc = MultimodalRetriever(index=index, k=1, inline_images=True).invoke("a cat")[0]
    assert base64.b64decode(doc.metadata["image_base64"]) == Path(doc.metadata["source"]).read_bytes()
    assert doc.metadata["mime_type"] == "image/jpeg"


def test_every_image_query_form_finds_the_same(index, photo_dir, photo_server):
    from PIL import Image

    photo = photo_dir / "rocket_launch.jpg"
    data = photo.read_bytes()
    retriever = MultimodalRetriever(index=index, k=3)
    expected = ids(retriever.invoke(photo))
    assert names(retriever.invoke(photo))[0] == "rocket_launch.jpg"
    forms = [
        str(photo),
        data,
        Image.open(photo),
        "data:image/jpeg;base64," + base64.b64encode(data).decode(),
        f"{photo_server}/rocket_launch.jpg",
    ]
    for form in forms:
        assert ids(retriever.invoke(form)) == expected, type(form)


def test_url_fetch_errors_are_clear(index, photo_server):
    retriever = MultimodalRetriever(index=index, k=1)
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        retriever.invoke(f"{photo_server}/missing.jpg")
    with pytest.raises(ImageFetchError, match="byte cap"):
        MultimodalRetriever(index=index, k=1, max_fetch_bytes=1000).invoke(f"{photo_server}/cat_chelsea.jpg")
    with pytest.raises(ImageFetchError, match="not an image"):
        retriever.invoke(f"{photo_server}/captions.jsonl")
    with pytest.raises(ValueError, match="turned off"):
        MultimodalRetriever(index=index, k=1, fetch_urls=False).invoke(f"{photo_server}/cat_chelsea.jpg")
    # a server that accepts the connection and never answers
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        start = time.monotonic()
        with pytest.raises(ImageFetchError, match="no answer within 0.5 s"):
            MultimodalRetriever(index=index, k=1, fetch_timeout=0.5).invoke(
                f"http://127.0.0.1:{silent.getsockname()[1]}/x.jpg"
            )
        assert time.monotonic() - start < 5
    finally:
        silent.close()


def test_string_rules():
    assert resolve_query("a photo of a dog") == "a photo of a dog"
    assert resolve_query("what is in holiday.jpg") == "what is in holiday.jpg"  # text: has spaces
    with pytest.raises(ValueError, match="no image file"):
        resolve_query("holiday.jpg")
    with pytest.raises(ValueError, match="base64 image data URIs"):
        resolve_query("data:text/plain;base64,aGk=")
    with pytest.raises(ValueError, match="malformed"):
        resolve_query("data:image/png;base64,@@@")
    assert resolve_query("http is a protocol") == "http is a protocol"


def test_target_filter_and_threshold(index):
    text = MultimodalRetriever(index=index, k=2, target="text").invoke("a rocket taking off")
    assert names(text)[0] == "rocket_launch.jpg" and all(d.page_content for d in text)
    both = MultimodalRetriever(index=index, k=3, target="both").invoke("a cat")
    assert names(both)[0] == "cat_chelsea.jpg" and both[0].metadata["target"] == "both"
    dev = MultimodalRetriever(index=index, k=5, filter={"split": "dev"}).invoke("a cup of coffee")
    assert sorted(names(dev)) == ["cat_chelsea.jpg", "rocket_launch.jpg"]
    everything = MultimodalRetriever(index=index, k=10).invoke("a cat")
    cut = everything[2].metadata["score"]
    kept = MultimodalRetriever(index=index, k=10, score_threshold=cut).invoke("a cat")
    assert ids(kept) == ids(everything[:3])


def test_mmr_reranks_stored_vectors(index, encoder, photo_dir):
    plain = MultimodalRetriever(index=index, k=4).invoke("a cat")
    relevant = MultimodalRetriever(index=index, k=4, search_type="mmr", lambda_mult=1.0).invoke("a cat")
    assert ids(relevant) == ids(plain)  # all relevance, no diversity: the similarity order
    diverse = MultimodalRetriever(index=index, k=4, search_type="mmr", fetch_k=10, lambda_mult=0.0).invoke("a cat")
    assert ids(diverse)[0] == ids(plain)[0]
    vectors = stored_vectors(index.store, ids(plain) + ids(diverse))

    def redundancy(docs: list[Document]) -> float:
        m = np.stack([vectors[d.metadata["id"]]["image"] for d in docs])
        sim = m @ m.T
        return float(sim[np.triu_indices(len(docs), 1)].max())

    assert redundancy(diverse) <= redundancy(plain)
    # the vectors are the stored ones, not re-embedded: they match the tower's embedding of the file
    cat = next(d for d in plain if d.metadata["source"].endswith("cat_chelsea.jpg"))
    from mmrag.media import load_image

    expected = encoder.embed_images(load_image(photo_dir / "cat_chelsea.jpg"))
    assert np.allclose(vectors[cat.metadata["id"]]["image"], expected, atol=1e-4)
    assert set(vectors[cat.metadata["id"]]) == {"image", "text"}


def test_mmr_on_a_client_store(encoder, sample_photos):
    with Index.open(":memory:", encoder) as mem:
        mem.add(sample_photos[:4], progress=False)
        docs = MultimodalRetriever(index=mem, k=3, search_type="mmr", fetch_k=4).invoke("a cat")
        assert len(docs) == 3 and len(set(ids(docs))) == 3


def test_mmr_math():
    cands = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0]], dtype=np.float32)
    query = np.array([1.0, 0.05], dtype=np.float32)
    assert maximal_marginal_relevance(query, cands, 2, 1.0) == [0, 1]
    assert maximal_marginal_relevance(query, cands, 2, 0.3) == [0, 2]


def test_per_call_options_and_unknown_ones(index):
    retriever = MultimodalRetriever(index=index, k=5)
    assert len(retriever.invoke("a cat", k=2)) == 2
    assert len(asyncio.run(retriever.ainvoke("a cat", k=2))) == 2
    with pytest.raises(TypeError, match="unknown retriever options"):
        retriever.invoke("a cat", top_k=2)


def test_concurrent_ainvoke_overlaps_and_matches_invoke(index, monkeypatch):
    retriever = MultimodalRetriever(index=index, k=3)
    queries = ["a cat", "a rocket", "coins", "the moon", "a camera", "coffee", "a book page", "stars",
               "an astronaut", "a microscope slide"] * 2
    expected = {q: ids(retriever.invoke(q)) for q in set(queries)}
    spans: list[tuple[float, float]] = []
    search = index.search

    def recording_search(*args, **kwargs):
        start = time.perf_counter()
        try:
            return search(*args, **kwargs)
        finally:
            spans.append((start, time.perf_counter()))

    monkeypatch.setattr(index, "search", recording_search)

    async def run_all():
        return await asyncio.gather(*(retriever.ainvoke(q) for q in queries))

    results = asyncio.run(run_all())
    assert [ids(r) for r in results] == [expected[q] for q in queries]
    assert len(spans) == 20
    overlapping = sum(
        1 for i, (s1, e1) in enumerate(spans) for (s2, e2) in spans[i + 1:] if s1 < e2 and s2 < e1
    )
    assert overlapping >= 5, f"only {overlapping} overlapping pairs of calls: the calls ran one after another"


def test_lcel_chain(index):
    seen: list[str] = []

    def format_docs(docs: list[Document]) -> str:
        return "\n".join(f"{Path(d.metadata['source']).name}: {d.page_content}" for d in docs)

    prompt = ChatPromptTemplate.from_messages([("human", "Photos:\n{context}")])
    chain = (
        MultimodalRetriever(index=index, k=2)
        | format_docs
        | prompt
        | RunnableLambda(lambda p: seen.append(p.to_string()) or p)
        | FakeListChatModel(responses=["a cat"])
        | StrOutputParser()
    )
    assert chain.invoke("a cat") == "a cat"
    assert "cat_chelsea.jpg: a ginger cat looking to the side" in seen[0]


# -- the embeddings --------------------------------------------------------------------------------

def test_embeddings_lazy_spec_and_images(encoder, sample_photos):
    lazy = MultimodalEmbeddings(encoder.spec)
    assert lazy._encoder is None  # constructing loads nothing
    with pytest.raises(TypeError):
        MultimodalEmbeddings(42)  # type: ignore[arg-type]
    emb = MultimodalEmbeddings(encoder, batch_size=3)
    from mmrag.media import load_image

    vectors = np.array(emb.embed_image([str(p) for p in sample_photos[:4]]))
    assert np.allclose(vectors, encoder.embed_images([load_image(p) for p in sample_photos[:4]]), atol=1e-5)
    assert np.allclose(emb.embed_query("a cat"), encoder.embed_texts("a cat"), atol=1e-6)
    assert emb.embed_documents([]) == [] and emb.embed_image([]) == []


# -- the agent API ---------------------------------------------------------------------------------

def test_tool_schema_and_search_tool(index):
    schema = tool_schema("photo_search", "Find photos")
    assert schema["type"] == "function" and schema["function"]["name"] == "photo_search"
    params = schema["function"]["parameters"]
    assert set(params["properties"]) == {"query", "k", "target", "filters"} and params["required"] == ["query"]
    assert SEARCH_TOOL_SCHEMA["function"]["parameters"] == params
    results = search_tool(index, "a cat", k=2, filters={"split": ["dev", "train"]})
    assert json.loads(json.dumps(results)) == results
    assert Path(results[0]["uri"]).name == "cat_chelsea.jpg" and len(results) == 2
    with pytest.raises(ValueError, match="k must be"):
        search_tool(index, "a cat", k=0)
    with pytest.raises(ValueError, match="turned off"):
        search_tool(index, "http://127.0.0.1:9/x.jpg")


def test_index_as_tool(index):
    tool = index.as_tool(name="photo_search", description="Find photos")
    assert tool.name == "photo_search"
    assert set(tool.args) == {"query", "k", "target", "filters"}
    message = tool.invoke({"type": "tool_call", "id": "1", "name": "photo_search",
                           "args": {"query": "a rocket", "k": 2, "target": "both"}})
    assert json.loads(message.content) == message.artifact and len(message.artifact) == 2


def test_core_does_not_import_langchain():
    code = "import sys, mmrag, mmrag.index, mmrag.agent; print(any(m.startswith('langchain') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# -- the examples ----------------------------------------------------------------------------------

EXAMPLES = {
    "langchain_rag.py": ["=== model input ===", "1. cat_chelsea.jpg (score", "Question: a cat", "answer: "],
    "agent_tool.py": ['"type": "function"', "model calls photo_search with", "rocket_launch.jpg", "model answers: "],
}


def test_examples_run(tmp_path):
    """Both examples as a user runs them (started together: each spends most of its time loading)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = {
        script: subprocess.Popen(
            [sys.executable, str(REPO / "examples" / script), "--index", str(tmp_path / f"{script}.mmrag")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for script in EXAMPLES
    }
    for script, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == 0, f"{script}: {stderr[-2000:]}"
        for line in EXAMPLES[script]:
            assert line in stdout, f"{script}: {stdout}"
