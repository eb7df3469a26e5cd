#
# wrapper on top of the official llama.cpp server image: one container serves one profile.
#
#   docker build -t wrapper:cuda .                                   # NVIDIA x86-64 (default, CUDA 12)
#   docker build -t wrapper:cpu --build-arg LLAMA_IMAGE=ghcr.io/ggml-org/llama.cpp:server-b11434 .
#   docker build -t wrapper:jetson --platform linux/arm64 \
#     --build-arg LLAMA_IMAGE=dustynv/llama_cpp:r36.4.0 \
#     --build-arg LLAMA_SERVER_PATH=/usr/local/bin/llama-server \
#     --build-arg LLAMA_CUDA_ARCHS=87 .                               # Jetson Orin, JetPack 6 (L4T r36)
#
# RTX 5090 (Blackwell, compute capability 12.0) needs a llama.cpp built with CUDA 12.8+ for sm_120; name the
# build's architectures with LLAMA_CUDA_ARCHS so `wrapper serve` refuses a GPU the build cannot run on
# (exit 2) instead of crashing at load. See docs/deploy.md, "Image variants".
#
# No `# syntax=` line: the builder's own Dockerfile frontend is used, so an air-gapped builder needs
# nothing from a registry but the base images. BuildKit is needed for the optional CA secret below.
#
# The llama.cpp build is pinned by the image tag (b11434 is the build the test suite runs); change it
# with --build-arg LLAMA_IMAGE=... and check the result with `wrapper flags`.

ARG LLAMA_IMAGE=ghcr.io/ggml-org/llama.cpp:server-cuda-b11434
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8
# managed: uv's own CPython 3.11 under /opt/python (same on every base). system: the base image's
# python3 from its package manager, for builders that cannot download the managed one.
ARG PYTHON_SOURCE=managed

FROM ${UV_IMAGE} AS uv

# Build stage on the same base as the runtime, so the venv's wheels match the runtime's libc and arch.
FROM ${LLAMA_IMAGE} AS deps
ARG PYTHON_SOURCE
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PROJECT_ENVIRONMENT=/opt/wrapper/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
WORKDIR /src
# Only the lockfile and the project metadata: a README or code edit does not re-download any wheel.
COPY pyproject.toml uv.lock ./
# A TLS-intercepting proxy: `--secret id=ca_bundle,src=corp-ca.pem` makes uv trust that CA (PEM bundle).
# It is mounted for this step only and never lands in a layer or in the runtime image.
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca_bundle,target=/run/secrets/ca_bundle \
    set -eu; \
    if [ -s /run/secrets/ca_bundle ]; then export SSL_CERT_FILE=/run/secrets/ca_bundle; fi; \
    if [ "${PYTHON_SOURCE}" = system ]; then \
        apt-get update && apt-get install -y --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*; \
        export UV_PYTHON=python3 UV_PYTHON_PREFERENCE=only-system; \
    else \
        export UV_PYTHON=3.11 UV_PYTHON_PREFERENCE=only-managed; \
        uv python install 3.11; \
    fi; \
    mkdir -p /opt/python; \
    uv sync --frozen --no-dev --no-install-project

# The project itself, installed into a copy of the venv; only its own files go on to the runtime.
FROM deps AS project
ARG PYTHON_SOURCE
COPY README.md ./
COPY wrapper/ ./wrapper/
# Building the wheel fetches the build backend: the same optional CA as above.
RUN --mount=type=secret,id=ca_bundle,target=/run/secrets/ca_bundle \
    set -eu; \
    if [ -s /run/secrets/ca_bundle ]; then export SSL_CERT_FILE=/run/secrets/ca_bundle; fi; \
    if [ "${PYTHON_SOURCE}" = system ]; then export UV_PYTHON=python3 UV_PYTHON_PREFERENCE=only-system; \
    else export UV_PYTHON=3.11 UV_PYTHON_PREFERENCE=only-managed; fi; \
    uv sync --frozen --no-dev --no-editable; \
    /opt/wrapper/venv/bin/wrapper --version
# The files the install added, laid out as in the venv (paths relative to it, hence the WORKDIR).
WORKDIR /opt/wrapper/venv
RUN mkdir /stage \
    && cp -a --parents bin/wrapper lib/python3*/site-packages/wrapper lib/python3*/site-packages/wrapper-*.dist-info \
       /stage/

FROM ${LLAMA_IMAGE} AS runtime
ARG PYTHON_SOURCE
ARG LLAMA_SERVER_PATH=/app/llama-server
# The CUDA architectures the llama.cpp build was compiled for (CMake spelling: "86;89;120", "120-real"),
# when known. Blank: the preflight cannot check them and says so.
ARG LLAMA_CUDA_ARCHS=""
ARG WRAPPER_UID=10001

# tini as PID 1: forwards SIGTERM to `wrapper serve` and reaps orphans, also under a compose file or a
# `docker run` that does not say `init: true` / `--init` (-s: still reaps when Docker's init is PID 1).
# curl is the HEALTHCHECK's client. /run/wrapper is where instances register their ports and GPUs: owned by
# the image's user, mode 700 (a fresh named volume mounted there copies both), since the wrapper refuses a
# claim directory that other users could write forged claims into.
# hadolint ignore=DL3008
RUN set -eu; \
    extra=""; if [ "${PYTHON_SOURCE}" = system ]; then extra=python3; fi; \
    apt-get update \
    && apt-get install -y --no-install-recommends tini curl ca-certificates ${extra} \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid "${WRAPPER_UID}" wrapper \
    && useradd --system --uid "${WRAPPER_UID}" --gid "${WRAPPER_UID}" --create-home --home-dir /home/wrapper \
       --shell /usr/sbin/nologin wrapper \
    && mkdir -p /models/gguf /app/config /app/models /run/wrapper \
    && chown -R wrapper:wrapper /models \
    && chown wrapper:wrapper /run/wrapper && chmod 0700 /run/wrapper \
    && if [ -n "${LLAMA_CUDA_ARCHS}" ]; then \
         printf 'CUDA_ARCHITECTURES=%s\n' "${LLAMA_CUDA_ARCHS}" > "${LLAMA_SERVER_PATH}.build-info"; fi

# Dependencies (changes with uv.lock), then the project's own files (a few hundred KiB).
COPY --from=deps /opt/python /opt/python
COPY --from=deps /opt/wrapper/venv /opt/wrapper/venv
COPY --from=project /stage/ /opt/wrapper/venv/
# The registry is baked in (the seed's first common failure is a missing /app/config); mount a
# directory over /app/config, or point LLM_PROFILES_CONFIG_PATH elsewhere, to change it without a rebuild.
COPY config/ /app/config/
COPY scripts/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

ENV PATH=/opt/wrapper/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LLM_PROFILES_CONFIG_PATH=/app/config/llm_profiles.yaml \
    LLM_CACHE_DIR=/models \
    WRAPPER_STATE_DIR=/models/.wrapper \
    WRAPPER_RUNTIME_DIR=/run/wrapper \
    HF_HOME=/models/.cache/huggingface \
    LLAMA_SERVER_BIN=${LLAMA_SERVER_PATH} \
    WRAPPER_STATUS_PORT=8201 \
    CUDA_DEVICE_ORDER=PCI_BUS_ID

# Also on PATH: an env file that blanks LLAMA_SERVER_BIN ("blank = unset") must not lose the binary.
RUN test -x "${LLAMA_SERVER_BIN}" \
    && { command -v llama-server >/dev/null || ln -s "${LLAMA_SERVER_BIN}" /usr/local/bin/llama-server; } \
    && wrapper --version

# Numeric, so a runtime (Kubernetes runAsNonRoot) can verify it is not root without /etc/passwd.
USER ${WRAPPER_UID}:${WRAPPER_UID}
# Relative model paths resolve here: the tiny smoke-test profiles read /app/models (mount it, see docs).
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
# No arguments or options only: `wrapper serve ...`; a wrapper subcommand (`hw`, `plan ...`, or
# `wrapper hw`): that command; anything else (`sh`) is run as given.
ENTRYPOINT ["tini", "-s", "--", "docker-entrypoint.sh"]
CMD []
