"""Long-horizon agent episodes through the LangChain stack (`python -m evals.episodes`)."""
