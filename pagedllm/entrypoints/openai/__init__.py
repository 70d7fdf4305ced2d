"""The OpenAI-compatible server: protocol models, request handlers, metrics, and the FastAPI app."""
