"""The builtin OpenAI-compatible inference server behind `tunery serve`."""
