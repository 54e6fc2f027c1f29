"""The Tunery trainer: the container entrypoint that fetches data and model, trains, checkpoints and publishes."""
