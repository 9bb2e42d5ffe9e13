"""Sessions and their history (the durable store), document chunks, embeddings, retrieval, and the
context builder that fits system prompt + retrieved passages + history into a model's window.
Knows nothing about HTTP or Gradio; uses `llm_pool` only for its message and error types."""
