# Helpers shared by scripts/netns.sh and scripts/lan.sh (sourced, not run).

ns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qxF "$1"; }

# Stops the processes in a namespace (SIGTERM, then SIGKILL after 2 s) and deletes it;
# nothing if it does not exist.
remove_ns() {
    local ns="$1" pids i
    ns_exists "$ns" || return 0
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        for i in $(seq 20); do
            pids=$(ip netns pids "$ns" 2>/dev/null || true)
            [ -z "$pids" ] && break
            sleep 0.1
        done
        # shellcheck disable=SC2086
        [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    fi
    ip netns del "$ns" 2>/dev/null || true
}

# Closes every descriptor above 2 in the calling (sub)shell: for processes started in the background
# that must not hold the pipes or sockets the script's own caller is watching.
close_inherited_fds() {
    local fd
    for fd in /proc/self/fd/*; do
        fd="${fd##*/}"
        [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-" 2>/dev/null
    done
    return 0
}

# Rate in tc syntax (e.g. 1gbit, 500mbit, 2.5gbit, 800kbit) -> bits per second.
rate_bps() {
    local r="${1,,}"
    awk -v r="$r" 'BEGIN {
        if (match(r, /^[0-9]+(\.[0-9]+)?/) == 0) exit 1
        n = substr(r, 1, RLENGTH); u = substr(r, RLENGTH + 1)
        m["bit"] = 1; m["kbit"] = 1e3; m["mbit"] = 1e6; m["gbit"] = 1e9; m["tbit"] = 1e12
        m["bps"] = 8; m["kbps"] = 8e3; m["mbps"] = 8e6; m["gbps"] = 8e9
        if (u == "") u = "bit"
        if (!(u in m)) exit 1
        printf "%.0f\n", n * m[u]
    }'
}
