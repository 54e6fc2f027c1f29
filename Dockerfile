# The operator image: the base `tunery` package only (API, CLI, operator), never torch.
# Multi-stage: dependencies are built in a throw-away stage; the runtime stage runs as a non-root user.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer_image/ trainer_image/
RUN python -m venv /opt/tunery && /opt/tunery/bin/pip install .

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/tunery /opt/tunery
ENV PATH=/opt/tunery/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["tunery"]
CMD ["--help"]
