"""An agent-style loop over the mmrag search tool, offline: a scripted fake chat model asks for
the tool, the loop runs it, and the model answers from the tool's result.

    HF_HUB_OFFLINE=1 python examples/agent_tool.py [PHOTO_FOLDER] [--index DIR] [--query TEXT]

The same tool in the framework-free form is `mmrag.agent.tool_schema()` (a JSON function-calling
entry for any LLM API) plus `mmrag.agent.search_tool(index, **arguments)`; this script prints that
schema too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

import mmrag
from mmrag.agent import tool_schema
from mmrag.samples import export_sample_photos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path)
    parser.add_argument("--index", type=Path, default=Path(tempfile.gettempdir()) / "mmrag-agent.mmrag")
    parser.add_argument("--query", default="a rocket launch")
    args = parser.parse_args()
    folder = args.folder or export_sample_photos(Path(tempfile.gettempdir()) / "mmrag-samples")[0].parent

    print("tool schema:", json.dumps(tool_schema("photo_search", "Find photos in the library")))
    with mmrag.Index.open(args.index) as index:
        print(index.add(folder, progress=False))
        tool = index.as_tool(name="photo_search", description="Find photos in the library")
        call = {"name": "photo_search", "args": {"query": args.query, "k": 3, "target": "image"}, "id": "call-1"}
        # Scripted model: first turn asks for the tool, second turn answers.
        model = GenericFakeChatModel(
            messages=iter([AIMessage(content="", tool_calls=[call]), AIMessage(content="Here is what I found.")])
        )
        messages = [HumanMessage(f"Show me {args.query}")]
        tools = {tool.name: tool}
        while True:
            reply = model.invoke(messages)
            messages.append(reply)
            if not reply.tool_calls:
                break
            for tool_call in reply.tool_calls:
                print(f"model calls {tool_call['name']} with {json.dumps(tool_call['args'])}")
                result: ToolMessage = tools[tool_call["name"]].invoke({**tool_call, "type": "tool_call"})
                for hit in result.artifact:
                    print(f"  {hit['score']:.3f}  {Path(hit['uri']).name}")
                messages.append(result)
        print(f"model answers: {messages[-1].content}")


if __name__ == "__main__":
    main()
