"""The local test environment: a real Kubernetes control plane with kwok GPU nodes, and SeaweedFS as S3."""
