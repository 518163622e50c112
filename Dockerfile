# syntax=docker/dockerfile:1
# pacs-masks API server. Two stages: the dependencies are installed into a virtualenv in the
# first, and only that virtualenv and the code reach the final image (no pip cache, no build
# leftovers). Every dependency ships manylinux wheels for CPython 3.11 (asyncpg, uvloop,
# httptools, ...), so neither stage needs a compiler.
FROM python:3.11-slim AS deps

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies read from pyproject.toml alone, so editing the code reuses this stage.
COPY pyproject.toml /tmp/pyproject.toml
RUN python -m venv /opt/venv \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /srv/pacs-masks
COPY --from=deps /opt/venv /opt/venv

# Editable on purpose: app/db.py finds the Alembic scripts at <checkout>/migrations, next to
# the `app` package. A regular `pip install .` would put `app` in site-packages without them.
COPY . .
RUN pip install --no-deps -e .

# Runs unprivileged. The code stays root-owned (read-only to the server); only var/ is
# writable, for the embedded default (SQLite + local storage) when no DATABASE_URL is given.
# Mount a volume on /srv/pacs-masks/var to keep that data across containers.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pacs \
    && mkdir var \
    && chown pacs:pacs var
USER pacs

EXPOSE 8000

# slim has no curl; the interpreter is already here. urlopen raises on non-2xx, exit status 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# Configuration only through the environment (see the README's table); no file is read but
# an optional .env in the working directory, which the image does not contain.
# Migrate, then replace the shell with the server so it is PID 1 and receives SIGTERM.
# Alembic takes no lock against concurrent upgrades: with several replicas, run `pacs-masks migrate`
# once as a release step and start the replicas with `pacs-masks serve --host 0.0.0.0 --port 8000`.
CMD ["sh", "-c", "pacs-masks migrate && exec pacs-masks serve --host 0.0.0.0 --port 8000"]
