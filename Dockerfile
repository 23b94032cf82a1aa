# One image for every blogpipe deployable; the command picks which one runs.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core core
COPY api api
COPY stages stages
COPY notifier notifier
COPY migrations migrations
COPY blogpipe blogpipe
COPY bench bench
RUN pip install . && useradd --system --uid 10001 blogpipe
USER blogpipe
ENV PORT=8000 HOST=0.0.0.0
EXPOSE 8000
ENTRYPOINT ["blogpipe"]
CMD ["api"]
