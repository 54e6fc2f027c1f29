"""The FineTuneJob operator: handlers → decisions (status) → rendering (pure) and API I/O."""
