# llmproxy gateway image: slim Python, non-root, config mounted at /etc/llmproxy.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/llmproxy
COPY pyproject.toml README.md ./
COPY llmproxy ./llmproxy
# hadolint ignore=DL3013
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin llmproxy
COPY config /etc/llmproxy

USER 10001
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["llmproxy", "serve"]
CMD ["--config", "/etc/llmproxy/prod.yaml"]
