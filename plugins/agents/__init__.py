"""Direct agent API: agents the server keeps, with their conversations and warm KV caches.

``POST /v1/agents`` creates one (its system prompt prefilled and cached at once), ``GET`` lists
them or shows one with its cache footprint, ``DELETE`` frees what only it holds, and
``POST /v1/agents/{id}/messages`` continues its conversation (streaming or not).
"""

from __future__ import annotations

from semantic import hookimpl
from semantic.protocol import ProtocolSpec, RouteDoc

from .routes import blueprint
from .schema import AgentCreate, AgentDeleted, AgentDetail, AgentList, AgentOut, AgentReply, ErrorOut, TurnRequest

_AGENT = (400, 401, 404, 409, 413, 429, 500, 503)

ROUTES = (
    RouteDoc("POST", "/v1/agents", "Create an agent; its system prompt is cached at once", AgentCreate, AgentOut, ErrorOut, statuses=_AGENT, ok=201),
    RouteDoc("GET", "/v1/agents", "List agents with their cache footprint", response=AgentList, error=ErrorOut),
    RouteDoc("GET", "/v1/agents/{agent_id}", "One agent, with its conversation", response=AgentDetail, error=ErrorOut),
    RouteDoc("DELETE", "/v1/agents/{agent_id}", "Delete an agent; blocks only it holds are freed in memory and on disk", response=AgentDeleted, error=ErrorOut, statuses=_AGENT),
    RouteDoc(
        "POST", "/v1/agents/{agent_id}/messages", "Send messages; the reply is appended to the conversation", TurnRequest, AgentReply, ErrorOut, streams=True, statuses=_AGENT
    ),
)


@hookimpl
def register_protocols(register):
    register(ProtocolSpec("agents", blueprint, "Direct agent API: stateful agents with warm caches", ROUTES))
