# syntax=docker/dockerfile:1
# Server A (app server), run from source with tsx exactly as `npm run start:app` does.
# Build from the repository root:
#   docker build -f infra/docker/app-server.Dockerfile -t sfh-app-server .
# Configuration is the environment of README.md's table; production needs at least
# NODE_ENV=production (set here), DATABASE_URL, SESSION_SECRET, KEY_ENCRYPTION_KEY,
# APP_PUBLIC_URL, DOWNLOAD_PUBLIC_URL and a STORAGE_DIR volume shared with B.

# Only the manifests, so that `npm ci` stays cached until a package.json or the lock changes.
FROM node:20-bookworm-slim AS manifests
WORKDIR /app
COPY . .
RUN find . -type f ! -name package.json ! -name package-lock.json -delete \
 && find . -depth -type d -empty -delete

FROM node:20-bookworm-slim
WORKDIR /app
COPY --from=manifests /app ./
# Every workspace, dev dependencies included: tsx (a root dev dependency) runs the server.
RUN npm ci --no-audit --no-fund && npm cache clean --force
COPY . .
RUN mkdir -p /data/files && chown -R node:node /data

ENV NODE_ENV=production \
    HOST=0.0.0.0 \
    APP_PORT=3000 \
    DATA_DIR=/data \
    STORAGE_DIR=/data/files
USER node
EXPOSE 3000

# The server drains on SIGTERM (SHUTDOWN_GRACE_SECONDS, default 30): give it longer than that,
# e.g. `docker stop -t 40` or compose's stop_grace_period.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.APP_PORT || 3000) + '/healthz').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
# node itself is PID 1 (no npm, no shell), so SIGTERM reaches the server.
CMD ["node", "--import", "tsx", "apps/app-server/src/server.ts"]
