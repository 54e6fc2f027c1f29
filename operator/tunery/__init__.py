"""Tunery: fine-tune and serve language models on Kubernetes (API, CLI and operator)."""
