"""A LangChain RAG chain over indexed photos, offline: retriever | format_docs | prompt | model.

    HF_HUB_OFFLINE=1 python examples/langchain_rag.py [PHOTO_FOLDER] [--index DIR] [--question TEXT]

With no folder, scikit-image's bundled sample photos are used. The chat model is one of
langchain-core's fake models (no LLM service), so the script prints exactly what a real model
would be given, then the fake model's answer.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

import mmrag
from mmrag.integrations.langchain import MultimodalRetriever
from mmrag.samples import export_sample_photos

PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "Answer from the retrieved photos only. Cite them by file name."),
        ("human", "Retrieved photos:\n{context}\n\nQuestion: {question}"),
    ]
)


def format_docs(docs: list[Document]) -> str:
    """One line per photo: rank, score, file name and caption (if any)."""
    lines = []
    for rank, doc in enumerate(docs, 1):
        name = Path(doc.metadata["source"]).name if doc.metadata["source"] else doc.metadata["id"]
        caption = f" - {doc.page_content}" if doc.page_content else ""
        lines.append(f"{rank}. {name} (score {doc.metadata['score']:.3f}){caption}")
    return "\n".join(lines)


def show_prompt(prompt_value):
    """Print what the model is given, then pass it on unchanged."""
    print("=== model input ===")
    for message in prompt_value.to_messages():
        print(f"[{message.type}] {message.content}")
    print("=== end of model input ===")
    return prompt_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path)
    parser.add_argument("--index", type=Path, default=Path(tempfile.gettempdir()) / "mmrag-langchain.mmrag")
    parser.add_argument("--question", default="a cat")
    parser.add_argument("-k", type=int, default=3)
    args = parser.parse_args()
    folder = args.folder or export_sample_photos(Path(tempfile.gettempdir()) / "mmrag-samples")[0].parent

    with mmrag.Index.open(args.index) as index:
        print(index.add(folder, progress=False))
        retriever = MultimodalRetriever(index=index, k=args.k)
        model = FakeListChatModel(responses=["The best match is the first photo listed."])
        chain = (
            {"context": retriever | format_docs, "question": RunnablePassthrough()}
            | PROMPT
            | RunnableLambda(show_prompt)
            | model
            | StrOutputParser()
        )
        answer = chain.invoke(args.question)
        print(f"answer: {answer}")


if __name__ == "__main__":
    main()
