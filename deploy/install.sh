#!/bin/sh
# Install edge-awq as a systemd service (Jetson, Raspberry Pi, any Linux box with systemd).
#
#   sudo deploy/install.sh MODEL.eawq [--ctx 2048] [--jetson]
#
# Puts a virtual environment with edge-awq from this checkout in /opt/edge-awq/venv, the model in
# /opt/edge-awq/models, the settings in /etc/edge-awq/edge-awq.env (kept if present), the unit in
# /etc/systemd/system, and MemoryMax= from `edge-awq plan` (the plan's total plus a quarter) in a
# drop-in. --jetson also builds the CUDA library and opens the GPU's device nodes to the unit.
# Then it verifies the unit, enables it and waits until the service says READY.
set -eu

usage() { echo "usage: sudo $0 MODEL.eawq [--ctx N] [--jetson]" >&2; exit 2; }
[ $# -ge 1 ] || usage
MODEL=$1; shift
CTX=2048; JETSON=0
while [ $# -gt 0 ]; do
    case $1 in
        --ctx) [ $# -ge 2 ] || usage; CTX=$2; shift 2 ;;
        --jetson) JETSON=1; shift ;;
        *) usage ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "$0: run as root (sudo): it writes /opt, /etc and systemd units" >&2; exit 2; }
[ -f "$MODEL" ] || { echo "$0: $MODEL: no such file" >&2; exit 2; }

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/edge-awq
ETC=/etc/edge-awq
UNIT_DIR=/etc/systemd/system
DROPIN=$UNIT_DIR/edge-awq.service.d

python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --quiet "$SRC"
"$PREFIX/venv/bin/edge-awq" verify "$MODEL"

install -d -m 0755 "$PREFIX/models" "$ETC" "$DROPIN"
DEST="$PREFIX/models/$(basename "$MODEL")"
install -m 0644 "$MODEL" "$DEST.tmp" && mv "$DEST.tmp" "$DEST"
cp "$SRC/README.md" "$PREFIX/README.md"

if [ ! -f "$ETC/edge-awq.env" ]; then
    sed -e "s#^EDGE_AWQ_MODEL=.*#EDGE_AWQ_MODEL=$DEST#" -e "s#^EDGE_AWQ_ARGS=.*#EDGE_AWQ_ARGS=--ctx $CTX#" \
        "$SRC/deploy/edge-awq.env.example" > "$ETC/edge-awq.env"
    chmod 0644 "$ETC/edge-awq.env"
fi

# MemoryMax: what the planner says this model and context need, plus a quarter for the allocator,
# Python and the page cache the service's own reads bring in. The plan refuses (exit 2) if it does
# not fit the machine at all.
TOTAL=$("$PREFIX/venv/bin/edge-awq" plan "$DEST" --ctx "$CTX" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"])')
MAX_MIB=$(( TOTAL * 5 / 4 / 1048576 + 1 ))
printf '[Service]\n# from: edge-awq plan %s --ctx %s (total %s bytes) + 25%%\nMemoryMax=%sM\n' \
    "$DEST" "$CTX" "$TOTAL" "$MAX_MIB" > "$DROPIN/memory.conf"

if [ "$JETSON" -eq 1 ]; then
    "$PREFIX/venv/bin/edge-awq" build-native --prefix "$PREFIX/native" --build-dir "$PREFIX/native-build"
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
systemd-analyze verify "$UNIT_DIR/edge-awq.service"
systemctl daemon-reload
systemctl enable edge-awq.service
systemctl restart edge-awq.service   # returns when the service has sent READY=1 (Type=notify)
systemctl --no-pager status edge-awq.service | head -n 5
echo "edge-awq is serving: curl http://127.0.0.1:\$EDGE_AWQ_PORT/ready (settings: $ETC/edge-awq.env)"
