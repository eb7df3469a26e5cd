# syntax=docker/dockerfile:1
#
# wrapper on top of the official llama.cpp server image: one container serves one profile.
#
#   docker build -t wrapper:cuda .                                   # NVIDIA x86-64 (default, CUDA 12)
#   docker build -t wrapper:cpu --build-arg LLAMA_IMAGE=ghcr.io/ggml-org/llama.cpp:server-b11434 .
#   docker build -t wrapper:jetson --platform linux/arm64 \
#     --build-arg LLAMA_IMAGE=dustynv/llama_cpp:r36.4.0 \
#     --build-arg LLAMA_SERVER_PATH=/usr/local/bin/llama-server .   # Jetson Orin, JetPack 6 (L4T r36)
#
# The llama.cpp build is pinned by the image tag (b11434 is the build the test suite runs); change it
# with --build-arg LLAMA_IMAGE=... and check the result with `wrapper flags`. See docs/deploy.md.

ARG LLAMA_IMAGE=ghcr.io/ggml-org/llama.cpp:server-cuda-b11434
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8

FROM ${UV_IMAGE} AS uv

# Build stage on the same base as the runtime, so the venv's wheels match the runtime's libc and arch.
FROM ${LLAMA_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
# A uv-managed CPython under /opt/python: the same 3.11 on every base (Ubuntu 22.04 on Jetson, 24.04
# upstream), and nothing from the distribution's python packages.
ENV UV_PYTHON=3.11 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_PROJECT_ENVIRONMENT=/opt/wrapper/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
WORKDIR /src
# Dependencies first (from the lockfile only), so a code change does not re-download them.
COPY pyproject.toml uv.lock README.md ./
RUN uv python install 3.11 && uv sync --frozen --no-dev --no-install-project
COPY wrapper/ ./wrapper/
RUN uv sync --frozen --no-dev --no-editable && /opt/wrapper/venv/bin/wrapper --version

FROM ${LLAMA_IMAGE} AS runtime
ARG LLAMA_SERVER_PATH=/app/llama-server
ARG WRAPPER_UID=10001

# tini as PID 1: forwards SIGTERM to `wrapper serve` and reaps orphans, also under a compose file or a
# `docker run` that does not say `init: true` / `--init` (-s: still reaps when Docker's init is PID 1).
# curl is the HEALTHCHECK's client.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid "${WRAPPER_UID}" --user-group --create-home --home-dir /home/wrapper \
       --shell /usr/sbin/nologin wrapper \
    && mkdir -p /models/gguf /app/config \
    && chown -R wrapper:wrapper /models

COPY --from=build /opt/python /opt/python
COPY --from=build /opt/wrapper/venv /opt/wrapper/venv
# The registry is baked in (the seed's first common failure is a missing /app/config); mount a
# directory over /app/config, or point LLM_PROFILES_CONFIG_PATH elsewhere, to change it without a rebuild.
COPY config/ /app/config/

ENV PATH=/opt/wrapper/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LLM_PROFILES_CONFIG_PATH=/app/config/llm_profiles.yaml \
    LLM_CACHE_DIR=/models \
    WRAPPER_STATE_DIR=/models/.wrapper \
    HF_HOME=/models/.cache/huggingface \
    LLAMA_SERVER_BIN=${LLAMA_SERVER_PATH} \
    WRAPPER_STATUS_PORT=8201

# Also on PATH: an env file that blanks LLAMA_SERVER_BIN ("blank = unset") must not lose the binary.
RUN test -x "${LLAMA_SERVER_BIN}" \
    && { command -v llama-server >/dev/null || ln -s "${LLAMA_SERVER_BIN}" /usr/local/bin/llama-server; } \
    && wrapper --version

# Numeric, so a runtime (Kubernetes runAsNonRoot) can verify it is not root without /etc/passwd.
USER ${WRAPPER_UID}:${WRAPPER_UID}
WORKDIR /app
VOLUME ["/models"]
# llama-server (the profile's llamacpp.port; 8080 unless the profile says otherwise) and the status server.
EXPOSE 8080 8201

# /healthz answers 200 only once llama-server is ready. A large model can take minutes to download and
# load: failures in the start period do not count against the container. Exit 1 = unhealthy (Docker's
# contract), whatever curl's own code was; sh expands WRAPPER_STATUS_PORT as set at run time.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD ["sh", "-c", "curl -fsS --max-time 4 -o /dev/null http://127.0.0.1:${WRAPPER_STATUS_PORT:-8201}/healthz || exit 1"]

# SIGTERM -> tini -> wrapper -> one SIGTERM to llama-server, then supervise.stop_grace_s (10 s) before
# SIGKILL: give the container longer than that (compose stop_grace_period: 30s, docker stop -t 30).
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "-s", "--", "wrapper", "serve"]
