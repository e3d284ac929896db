# One image for the API, the worker and the migrate job; the command picks the role.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dispatcher ./dispatcher
COPY api ./api
COPY runner ./runner
COPY providers ./providers
COPY dispatcher_client ./dispatcher_client
COPY sql ./sql
COPY migrations ./migrations
RUN pip install --no-cache-dir -e . && useradd --system --uid 10001 dispatcher
USER dispatcher
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
CMD ["dispatcher", "serve", "--host", "0.0.0.0", "--port", "8000"]
