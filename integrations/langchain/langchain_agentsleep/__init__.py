"""LangChain 1.x integration of agentsleep."""
