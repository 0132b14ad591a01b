"""The AI agent behind ``run_task``: a model drives the session's desktop through tools."""

from agent.loop import run_agent
from agent.model import ModelConfig
from agent.tools import TOOLS, AgentLog

__all__ = ["TOOLS", "AgentLog", "ModelConfig", "run_agent"]
