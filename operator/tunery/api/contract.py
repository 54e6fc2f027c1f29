"""The contract between the operator and the trainer container: paths, exit codes and the termination message."""

CONFIG_DIR = "/etc/tunery"
CONFIG_FILE = "trainer.json"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
RENDEZVOUS_PORT = 29500
# Rank 0 of the trainer serves Prometheus metrics here (`tunery-trainer train` reads TUNERY_METRICS_PORT).
TRAINER_METRICS_PORT = 9090
# The serving container's HTTP port (the OpenAI-compatible API and the probes).
SERVING_PORT = 8000
# The serving container's Prometheus /metrics port, apart from the API so that clients never reach it.
SERVING_METRICS_PORT = 9090
# The serving container reads the endpoint's API key from this variable (a secretKeyRef to serving.apiKeySecret).
API_KEY_ENV = "TUNERY_API_KEY"
# vLLM's own variable for the same key.
VLLM_API_KEY_ENV = "VLLM_API_KEY"
# The key of serving.apiKeySecret that holds the API key.
API_KEY_SECRET_KEY = "api-key"
# pvc://CLAIM/PATH is read at PVC_MOUNT_ROOT/CLAIM/PATH inside the trainer and server pods.
PVC_MOUNT_ROOT = "/mnt/pvc"

# Exit codes of the trainer. The bad-input classes are final: the Job's podFailurePolicy fails the Job at
# once instead of retrying; anything else (a crash, a lost node) is retried and resumes from a checkpoint.
EXIT_INVALID_CONFIG = 64
EXIT_DATA_ERROR = 65
EXIT_STORAGE_ERROR = 66
EXIT_UNSUPPORTED = 67
EXIT_OUT_OF_DISK = 68
EXIT_OUT_OF_MEMORY = 69
FINAL_EXIT_CODES = (
    EXIT_INVALID_CONFIG,
    EXIT_DATA_ERROR,
    EXIT_STORAGE_ERROR,
    EXIT_UNSUPPORTED,
    EXIT_OUT_OF_DISK,
    EXIT_OUT_OF_MEMORY,
)
# What the trainer exits with when a retry may help: an unreachable or failing store, or an unclassified crash.
EXIT_RETRYABLE = 1
# How long a trainer pod has between SIGTERM and SIGKILL (its terminationGracePeriodSeconds) unless the operator's
# settings say otherwise: a step and the upload of a large model's checkpoint. The trainer reads it from
# GRACE_SECONDS_ENV, to say at SIGTERM how long it has.
TERMINATION_GRACE_SECONDS = 300
GRACE_SECONDS_ENV = "TUNERY_TERMINATION_GRACE_SECONDS"
# How long the trainer's storage operations retry an unreachable or failing store unless the spec says otherwise.
STORAGE_RETRY_SECONDS = 300
