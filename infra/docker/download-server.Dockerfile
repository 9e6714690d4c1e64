# syntax=docker/dockerfile:1
# Server B (download server): the self-contained bundle `npm run start:download` runs
# (`npm run build`), alone on node:20-bookworm-slim. No node_modules, no sources in the image.
# Build from the repository root:
#   docker build -f infra/docker/download-server.Dockerfile -t sfh-download-server .
# Configuration is the environment of README.md's table; B needs APP_PUBLIC_URL,
# DOWNLOAD_PUBLIC_URL, JWKS_URL (or JWKS_FILE), REDIS_URL when it runs as several replicas, and
# the STORAGE_DIR volume A writes (read-only is enough). No database, no session secret.

# Only the manifests, so that `npm ci` stays cached until a package.json or the lock changes.
FROM node:20-bookworm-slim AS manifests
WORKDIR /app
COPY . .
RUN find . -type f ! -name package.json ! -name package-lock.json -delete \
 && find . -depth -type d -empty -delete

FROM node:20-bookworm-slim AS build
WORKDIR /app
COPY --from=manifests /app ./
# Every workspace, dev dependencies included: esbuild (a root dev dependency) bundles B.
RUN npm ci --no-audit --no-fund
COPY . .
RUN npm run build

FROM node:20-bookworm-slim
WORKDIR /app
COPY --from=build /app/apps/download-server/dist/server.mjs ./
RUN mkdir -p /data/files && chown -R node:node /data

ENV NODE_ENV=production \
    HOST=0.0.0.0 \
    DOWNLOAD_PORT=3001 \
    DATA_DIR=/data \
    STORAGE_DIR=/data/files
USER node
EXPOSE 3001

# B drains on SIGTERM: transfers in flight get SHUTDOWN_GRACE_SECONDS (default 30) to finish,
# so stop with more than that (`docker stop -t 40`, compose's stop_grace_period). SIGHUP
# re-reads the key set (`docker kill -s HUP`).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.DOWNLOAD_PORT || 3001) + '/healthz').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
# node itself is PID 1 (no npm, no shell), so SIGTERM and SIGHUP reach the server.
CMD ["node", "server.mjs"]
