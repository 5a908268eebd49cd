#!/bin/bash
# Spike (issue #11): one relay hop in user space against the kernel. As root:
#   testbed/spikes/kernel-relay/run.sh [ROUNDS] [ROUND_TRIPS]
# Builds relay.c with cc, makes two network namespaces joined by a veth pair
# (removed on exit, also on failure), runs the five modes interleaved ROUNDS
# times (default 5) with ROUND_TRIPS ping-pongs each (default 20000), then
# the checks (flood, up, hold, greet) and, where perf is installed, the kernel
# work items of two modes. See README.md.
set -euo pipefail
rounds=${1:-5}
n=${2:-20000}
here=$(cd "$(dirname "$0")" && pwd)
bin=$(mktemp -d)
c=krs-c-$$
s=krs-s-$$
cleanup() {
    ip netns del "$c" 2>/dev/null || true
    ip netns del "$s" 2>/dev/null || true
    rm -rf "$bin"
}
trap cleanup EXIT
cc -O2 -Wall -Wextra -o "$bin/relay" "$here/relay.c" -lpthread
ip netns add "$c"
ip netns add "$s"
ip link add krs0 netns "$c" type veth peer name krs1 netns "$s"
ip -n "$c" addr add 10.77.0.1/24 dev krs0
ip -n "$s" addr add 10.77.0.2/24 dev krs1
for ns in "$c" "$s"; do ip -n "$ns" link set lo up; done
ip -n "$c" link set krs0 up
ip -n "$s" link set krs1 up
echo "# $(date -u '+%F %H:%M UTC'), kernel $(uname -r), guest_halt_poll_ns $(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns 2>/dev/null || echo n/a)"
for r in $(seq "$rounds"); do
    for m in direct user sockmap half kernel; do
        timeout 120 "$bin/relay" "$c" "$s" "$m" "$n"
    done
done
for m in direct user half kernel; do
    timeout 60 "$bin/relay" "$c" "$s" "$m" 1 flood
    timeout 60 "$bin/relay" "$c" "$s" "$m" 1 up
done
timeout 60 "$bin/relay" "$c" "$s" kernel 1 hold
timeout 60 "$bin/relay" "$c" "$s" kernel 1 greet
timeout 60 "$bin/relay" "$c" "$s" kernel 1 greet-kick
# Kernel work items run while each mode carries 20,000 round trips (plus
# the warm-up): an sk_skb redirect into another socket queues one per
# message.
if command -v perf >/dev/null; then
    for m in user kernel; do
        perf stat -x, -e workqueue:workqueue_execute_start -a -- \
            timeout 120 "$bin/relay" "$c" "$s" "$m" 20000 2>&1 |
            sed "s/^\([0-9]*\),.*workqueue:workqueue_execute_start.*/$m: \1 kernel work items (all CPUs)/"
    done
fi
