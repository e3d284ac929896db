# One image for the API, the worker and the migrate job; the command picks the role.
# Dependencies come from requirements/deploy.lock.txt (hashed; the service with the otel extra, no embedded PostgreSQL,
# no test tools); the project itself is then installed without resolving anything.
# No health check instruction here: the three roles are healthy in different ways, so docker-compose.yml (and a platform's own
# probes, e.g. Cloud Run's startup probe on /health) declare one per service.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY requirements/deploy.lock.txt ./requirements/deploy.lock.txt
RUN pip install --no-cache-dir --require-hashes -r requirements/deploy.lock.txt
COPY pyproject.toml README.md ./
COPY dispatcher ./dispatcher
COPY api ./api
COPY runner ./runner
COPY providers ./providers
COPY cli ./cli
COPY dispatcher_client ./dispatcher_client
COPY sql ./sql
COPY migrations ./migrations
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && useradd --system --uid 10001 dispatcher
USER dispatcher
EXPOSE 8000
CMD ["dispatcher", "serve", "--host", "0.0.0.0", "--port", "8000"]
