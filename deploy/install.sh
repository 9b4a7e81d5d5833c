#!/bin/sh
# Install edge-awq as a systemd service (Jetson, Raspberry Pi, any Linux box with systemd).
#
#   sudo deploy/install.sh MODEL.eawq [--ctx 2048] [--jetson] [--root DIR]
#
# Puts a virtual environment with edge-awq from this checkout in /opt/edge-awq/venv, the model in
# /opt/edge-awq/models, the settings in /etc/edge-awq/edge-awq.env (kept if present), the unit in
# /etc/systemd/system, and MemoryMax= from `edge-awq plan` (the plan's total plus a quarter) in a
# drop-in. --jetson also builds the CUDA library and opens the GPU's device nodes to the unit.
# Then it verifies the unit, enables it and waits until the service says READY.
#
# --root DIR stages everything under DIR instead (for an image build, or to look before
# installing): no root needed, nothing enabled or started. EDGE_AWQ_PIP_ARGS passes extra flags to
# `pip install` (an offline wheel directory: EDGE_AWQ_PIP_ARGS="--no-index --find-links /media/wheels");
# EDGE_AWQ_VENV names a virtual environment that already has edge-awq, used as it is.
set -eu

usage() { echo "usage: sudo $0 MODEL.eawq [--ctx N] [--jetson] [--root DIR]" >&2; exit 2; }
die() { echo "$0: $*" >&2; exit 2; }
[ $# -ge 1 ] || usage
MODEL=$1; shift
CTX=2048; JETSON=0; ROOT=
while [ $# -gt 0 ]; do
    case $1 in
        --ctx) [ $# -ge 2 ] || usage; CTX=$2; shift 2 ;;
        --jetson) JETSON=1; shift ;;
        --root) [ $# -ge 2 ] || usage; ROOT=$2; shift 2 ;;
        *) usage ;;
    esac
done
[ -n "$ROOT" ] || [ "$(id -u)" -eq 0 ] || die "run as root (sudo): it writes /opt, /etc and systemd units"
[ -f "$MODEL" ] || die "$MODEL: no such file"
case $CTX in ''|*[!0-9]*) die "--ctx $CTX: not a number" ;; esac

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/edge-awq                    # paths as the service sees them
ETC=$ROOT/etc/edge-awq                   # paths written here (under --root when staging)
UNIT_DIR=$ROOT/etc/systemd/system
DROPIN=$UNIT_DIR/edge-awq.service.d
VENV=${EDGE_AWQ_VENV:-$ROOT$PREFIX/venv}
DEST=$PREFIX/models/$(basename "$MODEL")

if [ -z "${EDGE_AWQ_VENV:-}" ]; then
    python3 -m venv "$VENV"
    # shellcheck disable=SC2086 # the extra flags are meant to split
    "$VENV/bin/pip" install --quiet ${EDGE_AWQ_PIP_ARGS:-} "$SRC"
fi
"$VENV/bin/edge-awq" verify "$MODEL" >/dev/null || die "$MODEL does not verify: re-export or copy it again"

install -d -m 0755 "$ROOT$PREFIX/models" "$ETC" "$DROPIN"
install -m 0644 "$MODEL" "$ROOT$DEST.tmp" && mv "$ROOT$DEST.tmp" "$ROOT$DEST"
cp "$SRC/README.md" "$ROOT$PREFIX/README.md"

if [ ! -f "$ETC/edge-awq.env" ]; then
    sed -e "s#^EDGE_AWQ_MODEL=.*#EDGE_AWQ_MODEL=$DEST#" -e "s#^EDGE_AWQ_ARGS=.*#EDGE_AWQ_ARGS=--ctx $CTX#" \
        "$SRC/deploy/edge-awq.env.example" > "$ETC/edge-awq.env"
    chmod 0644 "$ETC/edge-awq.env"
fi

# MemoryMax: what the planner says this model and context need, plus a quarter for the allocator,
# Python and the page cache the service's own reads bring in. The plan refuses (exit 2) if it does
# not fit the machine at all.
MEM_KIB=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
"$VENV/bin/edge-awq" plan "$ROOT$DEST" --ctx "$CTX" --memory "${MEM_KIB}KiB" --json > "$ETC/plan.json" ||
    die "the model does not fit this machine at --ctx $CTX (see: edge-awq plan $DEST --memory ${MEM_KIB}KiB)"
TOTAL=$("$VENV/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["total"])' "$ETC/plan.json")
MAX_MIB=$(( TOTAL * 5 / 4 / 1048576 + 1 ))
printf '[Service]\n# from: edge-awq plan %s --ctx %s (total %s bytes) + 25%%\nMemoryMax=%sM\n' \
    "$DEST" "$CTX" "$TOTAL" "$MAX_MIB" > "$DROPIN/memory.conf"

if [ "$JETSON" -eq 1 ]; then
    "$VENV/bin/edge-awq" build-native --prefix "$ROOT$PREFIX/native" --build-dir "$ROOT$PREFIX/native-build"
    cat > "$DROPIN/jetson.conf" <<'CONF'
[Service]
# the cuda backend: the Jetson GPU's device nodes, and the group that owns them
PrivateDevices=no
DevicePolicy=closed
DeviceAllow=/dev/nvhost-ctrl rw
DeviceAllow=/dev/nvhost-ctrl-gpu rw
DeviceAllow=/dev/nvhost-prof-gpu rw
DeviceAllow=/dev/nvhost-gpu rw
DeviceAllow=/dev/nvhost-as-gpu rw
DeviceAllow=/dev/nvmap rw
DeviceAllow=char-nvidia rw
SupplementaryGroups=video
CONF
fi

install -m 0644 "$SRC/deploy/edge-awq.service" "$UNIT_DIR/edge-awq.service"
if [ -n "$ROOT" ]; then  # staged: verify a copy that points at the staged executable, start nothing
    sed "s#$PREFIX/venv/bin/edge-awq#$VENV/bin/edge-awq#" "$UNIT_DIR/edge-awq.service" > "$ETC/verify.service"
    systemd-analyze verify "$ETC/verify.service"
    rm "$ETC/verify.service"
    echo "staged under $ROOT: unit, drop-ins (MemoryMax=${MAX_MIB}M), $ETC/edge-awq.env, $PREFIX"
    exit 0
fi
systemd-analyze verify "$UNIT_DIR/edge-awq.service"
systemctl daemon-reload
systemctl enable edge-awq.service
systemctl restart edge-awq.service   # returns when the service has sent READY=1 (Type=notify)
systemctl --no-pager status edge-awq.service | head -n 5
echo "edge-awq is serving: curl http://127.0.0.1:\$EDGE_AWQ_PORT/ready (settings: $ETC/edge-awq.env)"
