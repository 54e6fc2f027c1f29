"""`python -m tunery_trainer` is `tunery-trainer` (torchrun starts the trainer this way)."""

from tunery_trainer.cli import app

app()
