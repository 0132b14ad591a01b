"""The AI agent behind ``run_task``: a model drives the session's desktop through tools."""

from agent.loop import AgentResult, run_agent
from agent.model import ModelConfig
from agent.tools import TOOLS, AgentLog

__all__ = ["TOOLS", "AgentLog", "AgentResult", "ModelConfig", "run_agent"]
