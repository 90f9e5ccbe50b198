# budget-sidecar: a slim, non-root image. `docker build -t budget-sidecar .`
# Runs `budget-sidecar serve`; configure with SIDECAR_CONFIG (the budgets file) and
# REDIS_URL (shared Redis). Without REDIS_URL it would start an embedded redis-server,
# which this image does not ship: in a container, always point it at a Redis.
FROM python:3.11-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir build
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY lua ./lua
RUN python -m build --wheel --outdir /dist

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_HOST=0.0.0.0 \
    SIDECAR_PORT=8787
COPY --from=build /dist/*.whl /tmp/
RUN pip install --no-cache-dir /tmp/*.whl && rm /tmp/*.whl \
    && useradd --system --uid 10001 --user-group --no-create-home sidecar
USER 10001:10001
EXPOSE 8787
# SIGTERM: stop accepting, finish requests in flight, close Redis; then exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["budget-sidecar"]
CMD ["serve"]
