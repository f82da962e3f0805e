"""LangChain 1.x integration of agentsleep: `SleepMemory` middleware and the `ChatSleepHybrid` chat model.

from langchain.agents import create_agent
from langchain_agentsleep import ChatSleepHybrid, SleepMemory

model = ChatSleepHybrid.from_pretrained("checkpoints/gsm-qlast-n2")
agent = create_agent(model, middleware=[SleepMemory(model, store="sqlite:///agents.db")], checkpointer=...)
"""

from langchain_agentsleep.budget import ReplyBudget
from langchain_agentsleep.chat_models import ChatSleepHybrid
from langchain_agentsleep.chat_template import ChatCodec, ChatTemplate
from langchain_agentsleep.errors import MessageTooLong, MissingAgentKey
from langchain_agentsleep.middleware import SleepMemory, SleepState
from langchain_agentsleep.served import ChatSleepServer
from langchain_agentsleep.tokens import count_tokens_tiktoken, tiktoken_counter

__all__ = [
    "ChatCodec",
    "ChatSleepHybrid",
    "ChatSleepServer",
    "ChatTemplate",
    "MessageTooLong",
    "MissingAgentKey",
    "ReplyBudget",
    "SleepMemory",
    "SleepState",
    "count_tokens_tiktoken",
    "tiktoken_counter",
]
